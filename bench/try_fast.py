"""Why is lb.logit_lens slower than the compute floor? Profile ``_lens_stats`` and ablate the proposed changes.

    .venv/bin/python bench/try_fast.py [--threads 1] [--rounds 2]

Runs in ONE process on precomputed hidden states (one hooked forward of the 512-token benchmark text), so only
the statistics part is compared. Variants are interleaved round by round and the minimum is kept; CPU time is
reported next to wall time because with 1 thread it barely depends on other processes competing for the CPU.
Writes bench/INVESTIGATION.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lensbench as lb  # noqa: E402
from lensbench.probes import lens as lens_mod  # noqa: E402
from lens_fast import lens_stats_fast  # noqa: E402
from run import float64_reference, cpu_jiffies, foreign_cpu  # noqa: E402

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"),
    "logsumexp (amax/sub/exp/sum/log/add/inf-handling)": ("aten::logsumexp",),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "INVESTIGATION.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = lb.load()
    ids = [m.encode(t)[:512] for t in lb.sample_texts()]
    ids = [x for x in ids if len(x) == 512][0]
    L = m.n_layers
    layers = list(range(L + 1))
    with torch.no_grad(), m.hooks(None) as store:
        out = m.model(input_ids=ids[None], use_cache=False)
    hidden = {la: store[la][0] for la in layers}
    del out
    tgt = torch.full_like(ids, -1)
    tgt[:-1] = ids[1:]
    chunk = lens_mod._chunk_for(m, 8 * 2**20)
    kw = dict(top_k=10, lens=None, apply_final_norm=True, chunk=chunk)

    def floor_part():
        for la in range(L):
            m.unembed(hidden[la])

    variants = {
        "current `_lens_stats` (chunk 42 rows)": lambda: lens_mod._lens_stats(m, hidden, layers, ids, tgt, **kw),
        "proposed, no layer grouping (changes 2-6)": lambda: lens_stats_fast(m, hidden, layers, ids, tgt,
                                                                             group_rows=1, **kw),
        "proposed, layers grouped to >=128 rows per matmul (1-6)": lambda: lens_stats_fast(
            m, hidden, layers, ids, tgt, group_rows=128, **kw),
        "proposed, grouped to >=256 rows per matmul": lambda: lens_stats_fast(
            m, hidden, layers, ids, tgt, group_rows=256, **kw),
        "floor part: 30 x m.unembed(h[512, d]) (no statistics)": floor_part,
    }
    best = {k: (float("inf"), float("inf")) for k in variants}
    results = {}
    j0, c0 = cpu_jiffies(), time.process_time()
    with torch.no_grad():
        for k, f in variants.items():   # warm-up
            results[k] = f()
        for _ in range(args.rounds):
            for k, f in variants.items():
                c = time.process_time()
                t = time.perf_counter()
                f()
                w, cp = time.perf_counter() - t, time.process_time() - c
                best[k] = (min(best[k][0], w), min(best[k][1], cp))
                print(f"{k}: {w:.2f} s wall, {cp:.2f} s CPU", flush=True)
    other = foreign_cpu(j0, cpu_jiffies(), time.process_time() - c0)

    # accuracy vs float64 and agreement with the current implementation
    ref = float64_reference(m, ids)
    cur = results["current `_lens_stats` (chunk 42 rows)"]
    acc = {}
    for k, r in results.items():
        if not isinstance(r, dict):
            continue
        acc[k] = {
            "ent_err": float((r["entropy"].double() - ref["entropy"]).abs().max()),
            "kl_err": float((r["kl_to_final"].double() - ref["kl_to_final"]).abs().max()),
            "top_eq": float((r["top_ids"] == cur["top_ids"]).float().mean()),
            "rank_diff": float((r["target_rank"][:, :-1] - cur["target_rank"][:, :-1]).abs().max()),
            "ce_diff": float((r["ce_next"][:, :-1] - cur["ce_next"][:, :-1]).abs().max()),
        }

    # profile of the current implementation, grouped by operator
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        lens_mod._lens_stats(m, hidden, layers, ids, tgt, **kw)
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    rows = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:14]
    lse = next((e.cpu_time_total for e in ka if e.key == "aten::logsumexp"), 0)

    floor_k = "floor part: 30 x m.unembed(h[512, d]) (no statistics)"
    lines = ["## Investigation: where `lb.logit_lens` spends its time", "",
             f"`.venv/bin/python bench/try_fast.py --threads {args.threads} --rounds {args.rounds}` — one process, "
             f"torch threads = {args.threads}, hidden states precomputed (one hooked forward of the 512-token "
             "text), so only the statistics stage is timed; min over rounds after a warm-up; other processes "
             f"used {other:.2f} cores on average meanwhile (CPU time is the robust column).", "",
             "| variant | wall s | CPU s | CPU / floor part | entropy err vs f64 | KL err vs f64 | top-10 ids = "
             "current | rank max diff | CE max diff |", "|---|---|---|---|---|---|---|---|---|"]
    fc = best[floor_k][1]
    for k in variants:
        w, cp = best[k]
        a = acc.get(k)
        tail = (f"{a['ent_err']:.1e} | {a['kl_err']:.1e} | {100 * a['top_eq']:.2f}% | {a['rank_diff']:.0f} | "
                f"{a['ce_diff']:.1e}") if a else "— | — | — | — | —"
        lines.append(f"| {k} | {w:.2f} | {cp:.2f} | {cp / fc:.2f} | {tail} |")
    lines += ["", f"torch.profiler, current `_lens_stats` (self CPU time by operator, total {total / 1e6:.1f} s; "
              f"`aten::logsumexp` including its children: {lse / 1e6:.1f} s = {100 * lse / total:.0f}%):", "",
              "| operator | calls | self CPU s | share |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
