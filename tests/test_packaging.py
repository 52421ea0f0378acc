"""Packaging: the wheel installs lensbench and lensbench.widgets; environment.yml matches pyproject."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in py["dependencies"]}
    for extra in ("notebook", "dev"):
        wanted |= {_name(r) for r in py["optional-dependencies"][extra] if not r.startswith("lensbench")}
    env = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^\s+- ([^#\n]+)$", env.split("- pip:")[1], flags=re.M)
    listed = {_name(x) for x in pip_lines if not x.startswith("-e")}
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"
    # same version floors on both sides
    for r in py["dependencies"]:
        if _name(r) != "torch":  # the env pins the CPU wheel torch==2.13.0
            assert r in env, f"{r} differs in environment.yml"


@pytest.mark.slow
def test_wheel_installs_library_and_widgets(tmp_path):
    """Build the wheel, install it (no deps) into a fresh venv whose dependencies come from ours, import both."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True)
    wheel = next(dist.glob("lensbench-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    # dependencies from our environment, added as a plain path (its editable-install hooks are not run)
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import lensbench, lensbench.widgets, lensbench.data; "
            "from lensbench.widgets import LogitLensExplorer; "
            f"assert 'site-packages' in lensbench.__file__ and str(lensbench.__file__).startswith({str(venv)!r}), lensbench.__file__; "
            f"assert lensbench.widgets.__file__.startswith({str(venv)!r}); "
            "assert len(lensbench.sample_texts()) >= 20; "
            "import lensbench.tasks as t; assert len(t.factual(200)) == 200; print('ok')")
    out = subprocess.run([str(vpy), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_editable_install_serves_widgets_from_top_level_folder():
    import lensbench.widgets
    assert Path(lensbench.widgets.__file__).resolve().parent == ROOT / "widgets"


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    assert blocks[0].strip().splitlines()[-1].strip() == "make demo"
    assert blocks[1].strip().splitlines()[-1].strip() == "make test"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
