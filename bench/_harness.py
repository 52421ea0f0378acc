"""What every bench script shares: timing, peak memory, the machine, results files, command lines, workers.

Scripts run from the repository root as ``python -m bench.<script>``. This module imports only the standard
library (torch and transformers are looked up lazily), so ``bench/attribution_inseq.py`` can use it from its
own environment and ``bench/gpu_check.py`` from a checkout where lensbench is not installed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "bench"
MARK = "@@BENCH@@"


# ---------------------------------------------------------------- timing


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def foreign_cpu(j0: tuple[int, int], j1: tuple[int, int], own_cpu_s: float) -> float:
    """Cores' worth of CPU used by *other* processes between two :func:`cpu_jiffies` readings."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = (j1[0] - j0[0]) / tick
    wall = (j1[1] - j0[1]) / tick / (os.cpu_count() or 1)
    return max(0.0, busy - own_cpu_s) / max(wall, 1e-9)


def wait_quiet(max_wait: float, busy_max: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``busy_max`` of the CPUs; returns seconds waited."""
    t0 = time.perf_counter()
    while True:
        j0 = cpu_jiffies()
        time.sleep(1.0)
        j1 = cpu_jiffies()
        busy = (j1[0] - j0[0]) / max(1, j1[1] - j0[1])
        if busy < busy_max or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


class Timer:
    """Runs of one case: wall seconds, this process's CPU seconds and other processes' CPU during each.

    ``timer(fn)`` runs ``fn()`` once (after a ``gc.collect()``, outside the clock), records the run and returns
    what ``fn`` returned (also kept as ``.out``). Calling two timers in turn interleaves two implementations so
    that load changes on a shared machine hit both. With one torch thread the CPU seconds of a run hardly depend
    on what else the machine runs, so ratios of CPU seconds are the robust comparison on a shared machine.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.other: list[float] = []
        self.out: Any = None

    def __call__(self, fn: Callable[[], Any]) -> Any:
        self.out = None
        gc.collect()
        j0, c0, t0 = cpu_jiffies(), time.process_time(), time.perf_counter()
        self.out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.other.append(foreign_cpu(j0, cpu_jiffies(), cpu))
        return self.out

    @property
    def min(self) -> float:
        """Fastest wall seconds."""
        return min(self.wall)

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def spread(self) -> float:
        """Slowest minus fastest wall seconds."""
        return max(self.wall) - min(self.wall)

    @property
    def best(self) -> float:
        """Fewest CPU seconds over the runs."""
        return min(self.cpu)

    @property
    def load(self) -> float:
        """Mean cores' worth of CPU other processes used during the runs."""
        return sum(self.other) / len(self.other)

    def cell(self) -> str:
        """``best CPU s (CPU s: ...; wall s: ...; other CPU x)`` for a results table."""
        return (f"{self.best:.2f} (CPU s: {', '.join(f'{c:.1f}' for c in self.cpu)}; wall s: "
                f"{', '.join(f'{w:.1f}' for w in self.wall)}; other CPU {self.load:.1f})")

    def summary(self) -> dict:
        """The runs and their statistics as a JSON-able dict."""
        return {"wall_s": self.wall, "cpu_s": self.cpu, "other_cpu": self.other, "min_s": self.min,
                "median_s": self.median, "spread_s": self.spread}


def time_rounds(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> tuple[Timer, list[float]]:
    """``warmup`` untimed calls, then ``rounds`` timed ones; returns (the timer, the warm-up wall seconds)."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    timer = Timer()
    for _ in range(rounds):
        timer(fn)
    return timer, warm


# ---------------------------------------------------------------- memory


def maxrss_mb() -> float:
    """This process's RSS high-water mark (``ru_maxrss``, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_status() -> dict[str, int]:
    """``RssAnon``, ``RssFile`` and ``VmRSS`` of this process in bytes (from /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


class PeakRSS:
    """Samples RssAnon/RssFile every ``every`` s in a thread while the block runs; ``.anon``/``.file``: peaks
    in bytes."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.anon = self.file = 0

    def _sample(self) -> None:
        s = proc_status()
        self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])

    def __enter__(self) -> PeakRSS:
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.is_set():
                self._sample()
                time.sleep(self.every)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


# ---------------------------------------------------------------- the machine


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def machine_info(packages: Sequence[str] = ()) -> dict:
    """CPU model, cores, RAM, load average, Python, torch (and its threads), transformers and ``packages``
    versions, and the date."""
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as fh:
            kib = next((int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal")), 0)
            mem = f"{kib / 2**20:.1f} GiB" if kib else ""
    except OSError:
        pass
    info = {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "mem": mem,
            "load": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch
        info.update(torch=torch.__version__, threads=torch.get_num_threads())
    except ImportError:
        info.update(torch="?", threads=None)
    for name in ("transformers", *packages):
        info[name] = _version(name.replace("_", "-"))
    return info


def machine_line(info: dict, load_end: Sequence[float] | None = None) -> str:
    """One markdown sentence describing :func:`machine_info` (and the load average at the end of the run)."""
    extra = "".join(f", {k.replace('_', '-')} {info[k]}" for k in info
                    if k not in {"cpu", "arch", "cores", "mem", "load", "python", "date", "torch", "threads"})
    ram = f", RAM {info['mem']}" if info.get("mem") else ""
    load = " / ".join(f"{x:.1f}" for x in info["load"])
    end = f", at the end {' / '.join(f'{x:.1f}' for x in load_end)}" if load_end is not None else ""
    return (f"{info['cpu']} ({info['arch']}), {info['cores']} cores{ram}; torch {info['torch']} "
            f"({info['threads']} threads), Python {info['python']}{extra}; load average (1/5/15 min) {load} at "
            f"the start{end}; {info['date']}.")


# ---------------------------------------------------------------- command lines and results files


def _portable(arg: str) -> str:
    """A path under the repository as a relative path; any other argument unchanged."""
    try:
        p = Path(arg).resolve()
    except (OSError, ValueError):
        return arg
    if os.sep in arg and p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    return arg


def command(module: str, argv: Sequence[str] | None = None, drop: Sequence[str] = ("--out",)) -> str:
    """The command that reproduces this run from the repository root: ``python -m bench.x ARGS``.

    ``argv`` defaults to ``sys.argv[1:]``; options in ``drop`` (and their values) are left out, paths under the
    repository become relative; a path elsewhere (a temporary folder) is left out with its option."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name in drop:
            i += 1 if "=" in a or i + 1 >= len(args) or args[i + 1].startswith("--") else 2
            continue
        keep.append(_portable(a))
        i += 1
    return " ".join(["python", "-m", module, *map(shlex.quote, keep)])


def parser(doc: str | None, out: Path | str | None, quick: str = "smaller sizes: a smoke run",
           ) -> argparse.ArgumentParser:
    """An argument parser with the module docstring as its help and the shared ``--quick`` and ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--out", type=Path, default=None if out is None else Path(out),
                    help="results file (markdown)" + (f"; default {_portable(str(out))}" if out else ""))
    return ap


def write_results(path: Path | str, lines: Sequence[str], cmd: str, data: dict | None = None,
                  json_path: Path | str | None = None, echo: bool = True) -> Path:
    """Write ``lines`` (markdown) to ``path`` and, when ``data`` is given, ``{"command": cmd, **data}`` as JSON
    to ``json_path`` (default: ``path`` with ``.json``). The markdown should name ``cmd`` itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip("\n") + "\n"
    path.write_text(text)
    if data is not None:
        jp = Path(json_path) if json_path is not None else path.with_suffix(".json")
        jp.write_text(json.dumps({"command": cmd, **data}, indent=1, default=str))
    if echo:
        print(text)
    return path


def reproduce_line(cmd: str) -> str:
    """``Reproduce (from the repository root): `cmd` ``."""
    return f"Reproduce (from the repository root): `{cmd}`"


# ---------------------------------------------------------------- subprocess workers


def emit(obj: dict) -> None:
    """A worker's result: one marked JSON line on stdout (read back by :func:`run_worker`)."""
    print(MARK + json.dumps(obj, default=str), flush=True)


def run_worker(module: str, args: Sequence[str], timeout: float | None = None, env: dict | None = None,
               python: str | None = None) -> dict:
    """Run ``python -m module ARGS`` from the repository root and return its :func:`emit` line; on a failure
    ``{"error": ...}`` with the end of its stderr. ``subprocess_s`` is the worker's wall time."""
    cmd = [python or sys.executable, "-m", module, *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK):])
            d["subprocess_s"] = time.perf_counter() - t0
            return d
    tail = "\n".join((p.stderr or "").strip().splitlines()[-8:])
    return {"error": f"exit {p.returncode}: {tail}"}
