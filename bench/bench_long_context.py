"""Long contexts: peak memory and time of lens, geometry and attribution on a 2k-token input of the
default model and an 8k-token input of a tiny model.  Each case runs in its own subprocess; the peak is the
``ru_maxrss`` high-water mark above the RSS right after loading (``/proc/self/clear_refs`` reset), so it counts
only what the probe allocates.  For scale, the 2k-token float32 logits of the default model alone are
2048 x 49152 x 4 B = 403 MB, and layers x tokens x vocab would be 12.5 GB.

    python -m bench.bench_long_context            # every case, writes bench/RESULTS-long-context.md
    python -m bench.bench_long_context --quick    # the tiny model's cases only
"""

from __future__ import annotations

import argparse
import time

from bench._harness import (
    HERE,
    command,
    emit,
    machine_info,
    machine_line,
    maxrss_mb,
    parser,
    reproduce_line,
    reset_peak,
    rss_mb,
    run_worker,
    write_results,
)

CASES = [
    ("default", 2048, "logit_lens"), ("default", 2048, "intrinsic_dimension"), ("default", 2048, "linearity"),
    ("default", 2048, "attribute_grad_x_input"), ("default", 2048, "attribute_ig8"),
    ("tiny", 8192, "logit_lens"), ("tiny", 8192, "intrinsic_dimension"), ("tiny", 8192, "attribute_grad_x_input"),
]


def run_case(model: str, n_tokens: int, probe: str) -> dict:
    import warnings

    import torch

    import lensbench as lb
    from lensbench.testing import tiny_model
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    m = lb.load() if model == "default" else lb.load(*tiny_model("llama", max_position_embeddings=8192))
    text = " ".join(lb.sample_texts())
    ids = m.encode(text, truncate=True)[:n_tokens]
    if len(ids) < n_tokens:
        ids = ids.repeat(n_tokens // len(ids) + 1)[:n_tokens]
    assert len(ids) == n_tokens
    decoded = m.tokenizer.decode(ids[1:] if ids[0] == m.tokenizer.bos_token_id else ids)
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    if probe == "logit_lens":
        r = lb.logit_lens(m, ids, top_k=5, progress=False)
        check = float(r.entropy.isfinite().float().mean())
    elif probe == "intrinsic_dimension":
        r = lb.intrinsic_dimension(m, ids, progress=False)
        check = float(torch.as_tensor(r.values).isfinite().float().mean())
    elif probe == "linearity":
        r = lb.linearity(m, ids, progress=False)
        check = float(torch.as_tensor(r.score).isfinite().float().mean())
    else:
        method, kw = (("grad_x_input", {}) if probe.endswith("grad_x_input")
                      else ("integrated_gradients", {"n_steps": 8, "batch_size": 2}))
        r = lb.attribute(m, decoded, method=method, progress=False, **kw)
        check = float(r.scores.isfinite().float().mean())
        n_tokens = r.scores.shape[1]
    dt = time.perf_counter() - t0
    peak = maxrss_mb()
    return {"model": model, "tokens": n_tokens, "probe": probe, "seconds": round(dt, 1),
            "peak_above_load_mb": round(peak - base), "finite_fraction": check}


def main(argv=None) -> None:
    ap = parser(__doc__, HERE / "RESULTS-long-context.md", quick="the tiny model's cases only")
    ap.add_argument("--case", nargs=3, metavar=("MODEL", "TOKENS", "PROBE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        emit(run_case(args.case[0], int(args.case[1]), args.case[2]))
        return
    mach = machine_info()
    cmd = command("bench.bench_long_context", argv)
    rows = []
    for model, n, probe in CASES:
        if args.quick and model != "tiny":
            continue
        r = run_worker("bench.bench_long_context", ["--case", model, str(n), probe],
                       env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        r.pop("subprocess_s", None)
        rows.append({"model": model, "tokens": n, "probe": probe, **r} if "error" in r else r)
        print(rows[-1], flush=True)
    lines = ["# Long contexts: peak memory of the probes", "",
             f"{machine_line(mach)} Shared with other jobs during the run. {reproduce_line(cmd)}.", "",
             "Peak = RSS high-water mark above the RSS after loading the model (each case in its own process). "
             "Reference sizes: the default model's 2k-token float32 logits are 403 MB; layers × tokens × vocab "
             "would be 12.5 GB at 2k tokens (31 × 2048 × 49152 × 4 B).", "",
             "| model | tokens | probe | seconds | peak above load (MB) | finite outputs |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['probe']} | — | — | ERROR: {r['error'][-120:]} |")
        else:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['probe']} | {r['seconds']} | "
                         f"{r['peak_above_load_mb']} | {r['finite_fraction']:.0%} |")
    write_results(args.out, lines, cmd)


if __name__ == "__main__":
    main()
