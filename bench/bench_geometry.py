"""Geometry benchmark: our TwoNN/GRIDE vs scikit-dimension, DADApy and a naive per-point loop; neighbourhood
overlap vs a per-token Python loop with sets; ID time vs N up to 50k points.

    .venv/bin/python bench/bench_geometry.py [--quick]

DADApy pins numpy<2, so it lives in a separate environment: ``python3 -m venv .venv-bench &&
.venv-bench/bin/pip install dadapy "numpy<2"``; this script runs it in a subprocess on the same arrays (saved
as .npy) and times only DADApy's own calls. Writes bench/RESULTS-geometry.md. Ratios in one run; no
assertions.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import lensbench as lb
from lensbench import estimators as E

HERE = Path(__file__).resolve().parent
DADAPY_PY = HERE.parent / ".venv-bench" / "bin" / "python"

DADAPY_SCRIPT = r"""
import json, sys, time, numpy as np
from dadapy import Data
out = []
for f in sys.argv[1:]:
    X = np.load(f)
    t = time.perf_counter(); d = Data(X); id2, _, _ = d.compute_id_2NN(); t2 = time.perf_counter() - t
    t = time.perf_counter(); d = Data(X); ids, _, rs = d.return_id_scaling_gride(range_max=8); tg = time.perf_counter() - t
    out.append({"twonn": float(id2), "gride_scales": [float(x) for x in ids], "t_twonn": t2, "t_gride": tg})
print(json.dumps(out))
"""


def naive_twonn(X: np.ndarray) -> float:
    """A per-point loop: distances of each point to all others, sort, r2/r1; then the TwoNN line fit."""
    N = len(X)
    mu = np.empty(N)
    for i in range(N):
        d = np.sqrt(((X - X[i]) ** 2).sum(1))
        d[i] = np.inf
        r = np.partition(d, 1)[:2]
        mu[i] = r[1] / r[0]
    mu = np.sort(mu[np.isfinite(mu)])
    k = int(len(mu) * 0.9)
    x = np.log(mu[:k])
    y = -np.log(1 - np.arange(1, k + 1) / len(mu))
    return float((x * y).sum() / (x * x).sum())


def overlap_loop(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    def nbrs(Z):
        D = ((Z[:, None, :] - Z[None]) ** 2).sum(-1) if len(Z) <= 2000 else None
        out = []
        for i in range(len(Z)):
            d = D[i].copy() if D is not None else ((Z - Z[i]) ** 2).sum(1)
            d[i] = np.inf
            out.append(set(np.argsort(d)[:k].tolist()))
        return out
    a, b = nbrs(X), nbrs(Y)
    return float(np.mean([len(a[i] & b[i]) / k for i in range(len(X))]))


def timed(fn, repeats=1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(quick: bool = False) -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    m = lb.load()
    text = " ".join(lb.sample_texts())
    ids = m.encode(text, truncate=True)[:1024]
    cap = m.capture(ids, progress=False)
    H = cap.hidden_states(0)                                        # [31, 1024, 576]
    layers = list(range(1, m.n_layers + 1, 3 if quick else 1))
    clouds = [H[la].double() for la in layers]
    lines = ["# Geometry benchmark", "",
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}. Reproduce: `.venv/bin/python bench/bench_geometry.py`.", "",
             f"One prompt's {H.shape[1]}-token cloud (d = {H.shape[2]}) at {len(layers)} layers of SmolLM2-135M.", ""]

    ours_tw, t_ours_tw = timed(lambda: [E.twonn(X) for X in clouds])
    ours_gr, t_ours_gr = timed(lambda: [E.gride_profile(X, 8) for X in clouds])
    import skdim
    sk, t_sk = timed(lambda: [skdim.id.TwoNN().fit(X.numpy()).dimension_ for X in clouds])
    n_naive = 3 if quick else 8
    nv, t_nv = timed(lambda: [naive_twonn(X.numpy()) for X in clouds[:n_naive]])
    t_nv_per = t_nv / n_naive
    rows = [("lensbench TwoNN", t_ours_tw, ""), ("scikit-dimension TwoNN", t_sk,
            f"max rel diff {max(abs(a - b) / b for a, b in zip(ours_tw, sk)):.1e}"),
            ("naive per-point loop TwoNN (numpy)", t_nv_per * len(layers),
             f"extrapolated from {n_naive} layers; max rel diff {max(abs(a - b) / b for a, b in zip(ours_tw, nv)):.1e}")]
    dada = None
    if DADAPY_PY.exists():
        with tempfile.TemporaryDirectory() as d:
            files = []
            for i, X in enumerate(clouds):
                f = Path(d) / f"x{i}.npy"
                np.save(f, X.numpy())
                files.append(str(f))
            out = subprocess.run([str(DADAPY_PY), "-c", DADAPY_SCRIPT, *files], capture_output=True, text=True)
            if out.returncode == 0:
                dada = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                lines.append(f"DADApy failed: `{out.stderr.strip().splitlines()[-1]}`")
    if dada:
        t_d2 = sum(r["t_twonn"] for r in dada)
        t_dg = sum(r["t_gride"] for r in dada)
        diff2 = max(abs(a - r["twonn"]) / r["twonn"] for a, r in zip(ours_tw, dada))
        # DADApy's GRIDE scales: n2 = 2, 4, 8 (index 0, 1, 2)
        diffg = max(abs(prof[n2] - r["gride_scales"][j]) / r["gride_scales"][j]
                    for prof, r in zip(ours_gr, dada) for j, n2 in enumerate((2, 4, 8)) if j < len(r["gride_scales"]))
        rows += [("DADApy compute_id_2NN", t_d2, f"max rel diff vs ours {diff2:.1e}"),
                 ("lensbench GRIDE profile (n2 = 2, 4, 8)", t_ours_gr, ""),
                 ("DADApy return_id_scaling_gride(range_max=8)", t_dg, f"max rel diff vs ours {diffg:.1e}")]
    else:
        rows.append(("DADApy", float("nan"), "not installed: see the docstring for the bench environment"))
    lines += ["| implementation | seconds (all layers) | note |", "|---|---|---|"]
    lines += [f"| {a} | {b:.3f} | {c} |" for a, b, c in rows]
    if dada:
        lines += ["", f"Speed-up vs DADApy: TwoNN {t_d2 / t_ours_tw:.1f}×, GRIDE {t_dg / t_ours_gr:.1f}× "
                  "(target ≥ 10×). Agreement target: within 1%."]
    lines.append(f"Speed-up vs the naive loop: {t_nv_per * len(layers) / t_ours_tw:.0f}×.")

    # neighbourhood overlap
    k = 10
    X, Y = H[10].double(), H[11].double()
    n_ov = 500 if quick else 1024
    ours_ov, t_ov = timed(lambda: float(E.neighbor_overlap(X[:n_ov], Y[:n_ov], k).mean()), 3)
    loop_ov, t_loop = timed(lambda: overlap_loop(X[:n_ov].numpy(), Y[:n_ov].numpy(), k))
    lines += ["", "## Neighbourhood overlap (layers 10 → 11, k = 10)", "",
              "| implementation | seconds | χ_k |", "|---|---|---|",
              f"| lensbench (vectorised) | {t_ov:.4f} | {ours_ov:.6f} |",
              f"| per-token Python loop with sets | {t_loop:.3f} | {loop_ov:.6f} |", "",
              f"Identical (to 1e-9): {abs(ours_ov - loop_ov) < 1e-9}; speed-up {t_loop / t_ov:.0f}× (target ≥ 100×)."]

    # scaling
    lines += ["", "## ID time vs number of points (TwoNN, d = 576 points on a 10-dim manifold)", "",
              "| N | seconds | ID |", "|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    B = torch.randn(10, 576, generator=g, dtype=torch.float64)
    for N in ([1000, 5000, 10000] if quick else [1000, 2000, 5000, 10000, 20000, 50000]):
        Z = torch.randn(N, 10, generator=g, dtype=torch.float64) @ B
        d, t = timed(lambda Z=Z: E.twonn(Z))
        lines.append(f"| {N} | {t:.2f} | {d:.2f} |")
    (HERE / "RESULTS-geometry.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main("--quick" in sys.argv)
