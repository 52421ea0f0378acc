"""lensbench performance benchmarks; every case runs in its own subprocess so peak memory is clean.

    python -m bench.run            # full run (repeats=3), writes bench/RESULTS.md and results.json beside it
    python -m bench.run --quick    # repeats=1
    python -m bench.run --only B.ours,B.floor   # a subset (RESULTS.md is still written)

Benchmark A ("foundation"): ``m.capture`` of all 31 layers, 8 texts x 512 tokens, vs a plain HF forward with
``output_hidden_states=True``.  Benchmark B ("logit lens"): ``lb.logit_lens`` over 31 layers x 512 tokens vs a
plain forward, the compute floor (forward + 30 unembeddings), a naive full-tensor implementation, a
TransformerLens ``TransformerBridge`` and an nnsight trace.

Method per subprocess: load the model (and build the nnsight/TransformerLens wrapper if the case needs one),
reset the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5, so the transient peak of loading does not
hide anything), run the reference forward pass once, read ``getrusage(RUSAGE_SELF).ru_maxrss`` as the baseline,
then run the case (1 warm-up + N timed repeats, all under ``torch.no_grad()``) and report the ``ru_maxrss``
increase over the baseline.  Time = min over the repeats of wall-clock seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time

from bench._harness import (
    HERE,
    emit,
    machine_info,
    maxrss_mb,
    parser,
    reset_peak,
    rss_mb,
    run_worker,
    time_rounds,
    wait_quiet,
    write_results,
)

T = int(os.environ.get("LENSBENCH_BENCH_T", "512"))  # tokens per text (env override only for debugging)
N_TEXTS_A = 8    # texts in benchmark A
TOP_K = 10

# case -> (benchmark, label)
CASES = {
    "A.hf_forward": ("A", "HF forward, output_hidden_states=True (reference)"),
    "A.capture": ("A", "ours: m.capture(8 x 512 ids, batch_size=8)"),
    "B.forward": ("B", "(a) plain forward, 1 x 512 (reference)"),
    "B.floor": ("B", "(b) compute floor: hooked forward + 30 unembeddings"),
    "B.ours": ("B", "ours: lb.logit_lens(m, ids512, top_k=10)"),
    "B.naive": ("B", "(c) naive: full [31,512,V] log-softmax + stats"),
    "B.tlens": ("B", "(d) TransformerBridge run_with_cache + ln_final/unembed per layer"),
    "B.nnsight": ("B", "(e) nnsight trace: lm_head(norm(layer.output)).save() per layer"),
}
AGREE_CASES = ("B.naive", "B.tlens", "B.nnsight")
SAVED_CASES = AGREE_CASES + ("B.ours",)


# =============================================================================================== worker side
def _stats_one_layer(z, final_lp, final_p, nxt):
    """The statistics lensbench reports, for one layer's logits z [T, V] (what a user would write)."""
    import torch
    lp = torch.log_softmax(z.float(), -1)
    p = lp.exp()
    ent = -(p * lp).sum(-1)
    kl = (final_p * (final_lp - lp)).sum(-1)
    tv, ti = lp.topk(TOP_K, -1)
    n_lp = lp[:-1].gather(-1, nxt[:, None])[:, 0]
    ce = -n_lp
    tprob = n_lp.exp()
    rank = (lp[:-1] > n_lp[:, None]).sum(-1)
    return {"entropy": ent, "kl_to_final": kl, "top_ids": ti, "top_probs": tv.exp(), "ce_next": ce,
            "target_prob": tprob, "target_rank": rank}


def _stack_stats(per_layer):
    import torch
    return {k: torch.stack([d[k] for d in per_layer]) for k in per_layer[0]}


def float64_reference(m, ids):
    """Entropy and KL(p_L || p_l) per layer in float64 from the model's float32 logits (ground truth)."""
    import torch
    L = m.n_layers
    with torch.no_grad(), m.hooks(None) as st:
        m.model(input_ids=ids[None], use_cache=False)
    with torch.no_grad():
        flp = torch.log_softmax(m.unembed(st[L][0]).double(), -1)
        fp = flp.exp()
        ent, kl = [], []
        for la in range(L + 1):
            lp = torch.log_softmax(m.unembed(st[la][0]).double(), -1)
            ent.append(-(lp.exp() * lp).sum(-1))
            kl.append((fp * (flp - lp)).sum(-1))
    return {"entropy": torch.stack(ent), "kl_to_final": torch.stack(kl)}


def build_case(case: str, m, ids_a, ids_b):
    """Returns (setup_fn or None, reference_fn, case_fn). The case_fn returns something to keep for checks."""
    import torch

    import lensbench as lb

    L = m.n_layers
    if case.startswith("A."):
        batch = torch.stack(ids_a)  # [8, 512]

        def reference():
            return m.model(input_ids=batch, output_hidden_states=True, use_cache=False)

        if case == "A.hf_forward":
            return None, reference, reference

        def ours():
            return m.capture(list(ids_a), batch_size=N_TEXTS_A, progress=False)
        return None, reference, ours

    ids = ids_b                 # [512]
    ids2 = ids[None]            # [1, 512]
    nxt = ids[1:]

    def forward():
        return m.model(input_ids=ids2, use_cache=False)

    if case == "B.forward":
        return None, forward, forward

    if case == "B.floor":
        def floor():
            with m.hooks(list(range(L))) as store:
                out = m.model(input_ids=ids2, use_cache=False)
            for la in range(L):           # layers 0..29; layer 30's logits are the forward's own output
                z = m.unembed(store[la][0])
                del z
            return out.logits
        return None, forward, floor

    if case == "B.ours":
        def ours():
            return lb.logit_lens(m, ids, top_k=TOP_K, progress=False)
        return None, forward, ours

    if case == "B.naive":
        model = m.model

        def naive():
            out = model(input_ids=ids2, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states  # 31 x [1, T, d]; HF's last entry is already final-normed for Llama
            resid = torch.cat(hs[:L])                                          # [30, T, d]
            logits = torch.cat([model.lm_head(model.model.norm(resid)), out.logits])  # [31, T, V]
            del out, hs, resid
            lp = torch.log_softmax(logits, -1)
            del logits
            p = lp.exp()
            ent = -(p * lp).sum(-1)
            kl = (p[-1] * (lp[-1] - lp)).sum(-1)
            tv, ti = lp.topk(TOP_K, -1)
            n_lp = lp[:, :-1].gather(-1, nxt[None, :, None].expand(L + 1, -1, 1))[..., 0]
            rank = (lp[:, :-1] > n_lp[..., None]).sum(-1)
            return {"entropy": ent, "kl_to_final": kl, "top_ids": ti, "top_probs": tv.exp(), "ce_next": -n_lp,
                    "target_prob": n_lp.exp(), "target_rank": rank}
        return None, forward, naive

    if case == "B.tlens":
        state = {}

        def setup():
            from transformer_lens.model_bridge import TransformerBridge
            from transformers import AutoTokenizer

            from lensbench.model import default_model_dir
            d = str(default_model_dir())
            tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
            state["bridge"] = TransformerBridge.boot_transformers(d, hf_model=m.model, tokenizer=tok)

        names = ["blocks.0.hook_in"] + [f"blocks.{i}.hook_out" for i in range(L)]

        def tlens():
            bridge = state["bridge"]
            logits, cache = bridge.run_with_cache(ids2, names_filter=names)
            final_lp = torch.log_softmax(logits[0].float(), -1)
            final_p = final_lp.exp()
            per_layer = []
            for name in names:
                z = bridge.unembed(bridge.ln_final(cache[name]))[0]            # [T, V]
                per_layer.append(_stats_one_layer(z, final_lp, final_p, nxt))
            return _stack_stats(per_layer)
        return setup, forward, tlens

    if case == "B.nnsight":
        state = {}

        def setup():
            import warnings

            from nnsight import LanguageModel
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state["lm"] = LanguageModel(m.model, tokenizer=m.tokenizer)

        def nns():
            lm = state["lm"]
            saved = []
            with lm.trace(ids2):
                saved.append(lm.lm_head(lm.model.norm(lm.model.embed_tokens.output)).save())
                for layer in lm.model.layers:
                    saved.append(lm.lm_head(lm.model.norm(layer.output)).save())
            final_lp = torch.log_softmax(saved[-1][0].float(), -1)
            final_p = final_lp.exp()
            return _stack_stats([_stats_one_layer(z[0], final_lp, final_p, nxt) for z in saved])
        return setup, forward, nns

    raise SystemExit(f"unknown case {case}")


def worker(case: str, repeats: int, tmp: str | None, threads: int | None = None) -> None:
    import torch

    import lensbench as lb

    if threads:
        torch.set_num_threads(threads)

    info: dict = {"case": case, "pid": os.getpid(), "threads": torch.get_num_threads(),
                  "load_before": os.getloadavg()}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = lb.load()
    info["load_s"] = time.perf_counter() - t0
    # token ids taken from the shipped texts: the first 512 tokens of each
    texts = lb.sample_texts()
    all_ids = [m.encode(t)[:T] for t in texts]
    ids_a = [x for x in all_ids if len(x) == T][:N_TEXTS_A]
    ids_b = ids_a[0]
    assert len(ids_a) == N_TEXTS_A
    setup, reference, fn = build_case(case, m, ids_a, ids_b)
    with torch.no_grad():
        if setup is not None:
            t0 = time.perf_counter()
            rss0 = rss_mb()
            setup()
            info["setup_s"] = time.perf_counter() - t0
            info["setup_mb"] = rss_mb() - rss0
        gc.collect()
        info["rss_loaded_mb"] = rss_mb()
        info["hwm_reset"] = reset_peak()
        ref = reference()
        del ref
        gc.collect()
        base = maxrss_mb()
        info["maxrss_baseline_mb"] = base
        info["ref_peak_above_loaded_mb"] = base - info["rss_loaded_mb"]
        timer, warm = time_rounds(fn, repeats, warmup=1)
        info["warmup_s"] = warm[0]
        info["foreign_cpu"] = timer.load
        res = timer.out
        peak = maxrss_mb()
    info.update(times=timer.wall, cpu_s=timer.cpu, maxrss_peak_mb=peak, peak_above_ref_mb=peak - base,
                peak_above_loaded_mb=peak - info["rss_loaded_mb"], load_after=os.getloadavg())
    if isinstance(res, list):   # logit_lens given a 1-D id tensor returns a one-element list
        info["note"] = f"returned a list of {len(res)}"
        res = res[0]
    if tmp and case in SAVED_CASES:
        ours_like = not isinstance(res, dict)
        keep = {k: (getattr(res, k) if ours_like else res[k]).detach().cpu()
                for k in ("entropy", "kl_to_final", "ce_next", "top_ids", "target_rank")}
        if ours_like:   # ours has a NaN at the last position of ce_next / target stats
            keep["ce_next"] = keep["ce_next"][:, :-1]
            keep["target_rank"] = keep["target_rank"][:, :-1]
        torch.save(keep, os.path.join(tmp, f"{case}.pt"))
    if tmp and case == "B.ours":   # untimed float64 reference (after the peak-memory reading)
        torch.save(float64_reference(m, ids_b), os.path.join(tmp, "B.f64.pt"))
    emit(info)


# =============================================================================================== parent side
MACHINE_PACKAGES = ("nnsight", "transformer_lens")


def run_case(case: str, repeats: int, tmp: str, timeout: float, threads: int | None = None) -> dict:
    args = ["--worker", case, "--repeats", str(repeats), "--tmp", tmp] + (["--threads", str(threads)] if threads
                                                                        else [])
    d = run_worker("bench.run", args, timeout=timeout)
    d.setdefault("case", case)
    return d


def agreement(tmp: str) -> dict:
    import torch
    f = os.path.join(tmp, "B.ours.pt")
    if not os.path.exists(f):
        return {}
    ours = torch.load(f)
    out = {}
    for c in AGREE_CASES:
        g = os.path.join(tmp, f"{c}.pt")
        if not os.path.exists(g):
            continue
        th = torch.load(g)
        d = {k: float((ours[k].float() - th[k].float()).abs().max()) for k in ("entropy", "kl_to_final", "ce_next")}
        d["top10_ids_equal"] = float((ours["top_ids"] == th["top_ids"]).float().mean())
        d["rank_max_diff"] = float((ours["target_rank"].float() - th["target_rank"].float()).abs().max())
        d["kl_rel"] = float(((ours["kl_to_final"] - th["kl_to_final"]).abs()
                             / ours["kl_to_final"].abs().clamp_min(1)).max())
        d["ok"] = d["entropy"] <= 1e-3 and d["kl_to_final"] <= 1e-3
        out[c] = d
    g = os.path.join(tmp, "B.f64.pt")
    if os.path.exists(g):
        ref = torch.load(g)
        errs = {}
        for c in ("B.ours",) + AGREE_CASES:
            f = os.path.join(tmp, f"{c}.pt")
            if os.path.exists(f):
                th = torch.load(f)
                e = {k: (th[k].double() - ref[k]).abs() for k in ("entropy", "kl_to_final")}
                errs[c] = {"entropy": float(e["entropy"].max()), "kl_to_final": float(e["kl_to_final"].max()),
                           "kl_worst_layer": int(e["kl_to_final"].max(1).values.argmax()),
                           "kl_at_worst": float(ref["kl_to_final"].reshape(-1)[e["kl_to_final"].argmax()])}
        out["f64"] = errs
    return out


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def run_command(args) -> str:
    """The command line that reproduces a run with these arguments."""
    metric = getattr(args, "metric", "wall") or "wall"
    return ("python -m bench.run" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
            + (f" --threads {args.threads}" if args.threads else "") + (" --metric cpu" if metric == "cpu" else ""))


def render(res: dict, agree: dict, mach: dict, args, total_s: float) -> list[str]:
    """RESULTS.md as lines."""
    metric = getattr(args, "metric", "wall") or "wall"
    key = "cpu_s" if metric == "cpu" else "times"

    def tmin(c):
        r = res.get(c)
        return min(r[key]) if r and key in r else None

    verdicts = []

    def verdict(name, measured, ok):
        v = "PASS" if ok else "MISS"
        if measured is None:
            v, measured = "N/A (case failed)", "—"
        verdicts.append((name, measured, v))
        return v

    threads_used = sorted({r["threads"] for r in res.values() if "threads" in r}) or [mach["threads"]]
    threads_used = ", ".join(map(str, threads_used))
    lines = ["# lensbench benchmarks", ""]
    lines += ["Reproduce (from the repository root):", "", "```", run_command(args), "```", ""]
    if metric == "cpu":
        lines += ["**Ratios, speed verdicts and \"faster than\" use process CPU seconds (`--metric cpu`)**, not wall "
                  "seconds: other processes were competing for the 2 cores, and with 1 torch thread the CPU time of "
                  "a case hardly depends on that, while its wall time does.", ""]
    lines += ["## Machine", "",
              f"- CPU: {mach['cpu']}, {mach['cores']} cores, RAM {mach['mem']}",
              f"- torch {mach['torch']} (intra-op threads: {threads_used}), Python {mach['python']}, "
              f"transformers {mach['transformers']}, nnsight {mach['nnsight']}, transformer-lens "
              f"{mach['transformer_lens']}",
              f"- date: {mach['date']}; repeats: {args.repeats} (min reported) after 1 warm-up; total run "
              f"{total_s:.0f} s",
              "- model: default SmolLM2-135M-Instruct (float32, 30 blocks, d=576, V=49152); token ids = first 512 "
              "tokens of the shipped sample texts", ""]
    lines += ["Method: every case runs in its own subprocess. After loading the model (and building the "
              "nnsight/TransformerLens wrapper where needed) the RSS high-water mark is reset "
              "(`/proc/self/clear_refs`), the reference forward pass is run once and `ru_maxrss` is read as the "
              "baseline; the case then runs (1 warm-up + repeats) under `torch.no_grad()`. *Peak above ref* = "
              "`ru_maxrss` increase over that baseline; *peak above load* = peak minus the RSS right after "
              "loading (so the reference row shows the reference's own peak). *other procs' CPU* = cores' "
              "worth of CPU used by other processes on the machine during the timed repeats (from /proc/stat minus "
              "this process's CPU time; 0 = quiet machine; with 2 cores and 2 torch threads anything above ~0.2 "
              "slows the case down, and badly: OpenMP threads then wait for each other). *CPU s* = process CPU "
              "time of the fastest repeat (includes OpenMP spin-waiting when threads > 1).",
              ""]

    def row(c, ref, extra_ratio=None, target="", ok=None):
        r = res.get(c, {})
        lab = CASES[c][1]
        if "error" in r or not r:
            err = " ".join(str(r.get("error", "not run")).split())[:200].replace("|", "/")
            return f"| {lab} | failed: {err} |" + " |" * (9 if extra_ratio else 8)
        t = min(r[key])
        runs = ", ".join(f"{x:.2f}" for x in r["times"])
        ratio = t / tmin(ref) if tmin(ref) else None
        cols = [lab, f"{min(r['times']):.2f}", runs, f"{min(r['cpu_s']):.2f}", fmt(ratio)]
        if extra_ratio:
            cols.append(fmt(t / tmin(extra_ratio)) if tmin(extra_ratio) else "—")
        cols += [f"{r['peak_above_ref_mb']:.0f}", f"{r['peak_above_loaded_mb']:.0f}",
                 f"{r['foreign_cpu']:.2f}", target or "—",
                 "—" if ok is None else ok]
        return "| " + " | ".join(cols) + " |"

    # ---- A
    a_ref, a_ours = tmin("A.hf_forward"), tmin("A.capture")
    lines += ["## A. foundation: capture all 31 layers, 8 texts × 512 tokens", "",
              "| case | seconds (min) | runs (s) | CPU s (min) | ratio to ref | peak above ref (MB) | peak above load (MB) "
              "| other procs' CPU | target | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    va = verdict("A: capture / HF forward ≤ 1.10", None if not (a_ref and a_ours) else f"{a_ours / a_ref:.2f}",
                 bool(a_ref and a_ours and a_ours / a_ref <= 1.10))
    lines.append(row("A.hf_forward", "A.hf_forward"))
    lines.append(row("A.capture", "A.hf_forward", target="ratio ≤ 1.10", ok=va))
    lines.append("")

    # ---- B
    b_floor, b_ours = tmin("B.floor"), tmin("B.ours")
    lines += ["## B. logit lens: 31 layers × 512 tokens, top-10 + all statistics, one text", "",
              "| case | seconds (min) | runs (s) | CPU s (min) | ratio to forward (a) | ratio to floor (b) | peak above ref (MB) "
              "| peak above load (MB) | other procs' CPU | target | result |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    v_floor = verdict("B: ours / compute floor ≤ 1.5",
                      None if not (b_floor and b_ours) else f"{b_ours / b_floor:.2f}",
                      bool(b_floor and b_ours and b_ours / b_floor <= 1.5))
    om = res.get("B.ours", {}).get("peak_above_ref_mb")
    v_mem = verdict("B: ours peak RSS above the forward pass ≤ 64 MB", None if om is None else f"{om:.0f} MB",
                    om is not None and om <= 64)
    faster = {}
    for c in AGREE_CASES:
        tc = tmin(c)
        faster[c] = verdict(f"B: ours faster than {c}", None if not (tc and b_ours) else
                            f"{b_ours:.2f} s vs {tc:.2f} s", bool(tc and b_ours and b_ours < tc))
    lines.append(row("B.forward", "B.forward", "B.floor"))
    lines.append(row("B.floor", "B.forward", "B.floor"))
    ours_ok = "PASS" if all(v == "PASS" for v in [v_floor, v_mem] + list(faster.values())) else "MISS"
    lines.append(row("B.ours", "B.forward", "B.floor", target="≤ 1.5× floor; ≤ 64 MB above ref; faster than "
                     "(c),(d),(e)", ok=ours_ok))
    for c in AGREE_CASES:
        lines.append(row(c, "B.forward", "B.floor", target="ours faster", ok=faster[c]))
    lines.append("")
    extra = []
    for c in ("B.tlens", "B.nnsight"):
        r = res.get(c, {})
        if "setup_s" in r:
            extra.append(f"{c}: wrapper setup {r['setup_s']:.2f} s, +{r['setup_mb']:.0f} MB RSS (before the baseline, "
                         "not counted above)")
    if extra:
        lines += ["Setup (one-off, excluded): " + "; ".join(extra), ""]

    # ---- agreement
    lines += ["### Numerical agreement with ours (max abs diff over 31 layers × 512 positions)", "",
              "| implementation | entropy | KL to final | KL relative (/max(1,KL)) | CE next | top-10 ids equal "
              "| target rank max diff | entropy & KL ≤ 1e-3 | KL closer to float64 (max abs err) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in AGREE_CASES:
        d = agree.get(c)
        if not d:
            lines.append(f"| {CASES[c][1]} | not available |  |  |  |  |  |  |  |")
            continue
        f64e = agree.get("f64", {})
        closer = "—"
        if c in f64e and "B.ours" in f64e:
            eo, et = f64e["B.ours"]["kl_to_final"], f64e[c]["kl_to_final"]
            closer = f"ours ({eo:.1e} vs {et:.1e})" if eo < et else f"{c} ({et:.1e} vs {eo:.1e})"
        lines.append(f"| {CASES[c][1]} | {d['entropy']:.2e} | {d['kl_to_final']:.2e} | {d['kl_rel']:.1e} | "
                     f"{d['ce_next']:.2e} | "
                     f"{100 * d['top10_ids_equal']:.2f}% | {d['rank_max_diff']:.0f} | {'PASS' if d['ok'] else 'MISS'} | "
                     f"{closer} |")
        if c in AGREE_CASES:
            verdict(f"B: {c} agrees with ours (entropy, KL ≤ 1e-3)", f"{max(d['entropy'], d['kl_to_final']):.1e}",
                d["ok"])
    lines.append("")
    f64 = agree.get("f64")
    if f64:
        lines += ["Error against a float64 reference (float64 log-softmax of the same float32 logits, per layer):", "",
                  "| implementation | entropy max abs err | KL max abs err | worst layer (KL there) |", "|---|---|---|---|"]
        for c, e in f64.items():
            lines.append(f"| {CASES[c][1]} | {e['entropy']:.2e} | {e['kl_to_final']:.2e} | {e['kl_worst_layer']} "
                         f"({e['kl_at_worst']:.1f} nats) |")
        lines.append("")

    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {n} | {m} | {v} |" for n, m, v in verdicts]
    lines.append("")
    return lines


def main() -> None:
    ap = parser(__doc__, HERE / "RESULTS.md", quick="repeats=1")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-case subprocess timeout (s)")
    ap.add_argument("--max-wait", type=float, default=30.0,
                    help="before each case wait up to this many seconds for other processes to go idle (0 = off)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in each case (default: torch's default = cores)")
    ap.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                    help="what ratios/verdicts use: wall seconds (default) or process CPU seconds (for a busy "
                         "machine, with --threads 1)")
    ap.add_argument("--report-only", action="store_true", help="re-render --out from the results.json beside it")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.worker:
        worker(args.worker, args.repeats, args.tmp, args.threads)
        return
    if args.report_only:
        saved = json.loads(args.out.with_name("results.json").read_text())
        for k in ("quick", "repeats", "only", "threads", "max_wait", "metric"):
            setattr(args, k, saved["args"].get(k, getattr(args, k, None)))
        mach = saved.get("machine") or machine_info(MACHINE_PACKAGES)
        write_results(args.out, render(saved["results"], saved["agreement"], mach, args, saved["total_s"]),
                      run_command(args))
        return
    cases = [c for c in CASES if not args.only or c in args.only.split(",")]
    tmp = HERE / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t_all = time.perf_counter()
    res = {}
    try:
        for c in cases:
            print(f"[bench] {c} ...", end=" ", flush=True)
            waited = wait_quiet(args.max_wait) if args.max_wait > 0 else 0.0
            r = run_case(c, args.repeats, str(tmp), args.timeout, args.threads)
            r["waited_s"] = waited
            res[c] = r
            if "error" in r:
                print("FAILED:", r["error"], flush=True)
            else:
                print(f"min {min(r['times']):.2f} s  runs {[round(x, 2) for x in r['times']]}  "
                      f"peak +{r['peak_above_ref_mb']:.0f} MB above ref (+{r['peak_above_loaded_mb']:.0f} above load)"
                      f"  other CPU {r['foreign_cpu']:.2f}  waited {r['waited_s']:.0f} s  "
                      f"[subprocess {r['subprocess_s']:.0f} s]", flush=True)
        agree = agreement(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    mach = machine_info(MACHINE_PACKAGES)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("out", "worker", "tmp", "report_only")}
    cmd = run_command(args)
    write_results(args.out, render(res, agree, mach, args, total), cmd,
                  {"args": saved_args, "results": res, "agreement": agree, "total_s": total, "machine": mach},
                  json_path=args.out.with_name("results.json"))


if __name__ == "__main__":
    main()
