"""Offloaded vs unsplit: wall time and peak memory of ``capture`` and ``logit_lens`` on the default model.

    python -m bench.bench_offload            # 3 timed rounds per configuration
    python -m bench.bench_offload --quick    # 1 round, fewer texts

Each configuration runs in its own subprocess (so peaks are not mixed): the unsplit model, ``device_map="auto"``
with a CPU budget that spills the later blocks to disk (``offload_folder``), and everything but the embedding on
disk. Memory is sampled every 2 ms from ``/proc/self/status``: ``RssAnon`` (the process's own allocations: torch
tensors, Python) and ``RssFile`` (pages of memory-mapped files: the safetensors weights accelerate reads back).
"held" = RssAnon after load (what the model, its hooks and accelerate's maps hold); "working set" = the peak
RssAnon during the call minus that. Writes ``bench/RESULTS-offload.md`` and ``bench/results-offload.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench._harness import (
    HERE,
    PeakRSS,
    command,
    emit,
    machine_info,
    machine_line,
    parser,
    proc_status,
    run_worker,
    write_results,
)

CHARS = 400
CONFIGS = {
    "unsplit": {},
    "auto, CPU 300 MB + disk": {"device_map": "auto", "max_memory": {"cpu": 300_000_000}},
    "all but embedding on disk": {"device_map": "auto", "max_memory": {"cpu": 1}},
}
#: configurations of --quick
QUICK = ("unsplit", "auto, CPU 300 MB + disk")


def child(name: str, rounds: int, n_texts: int) -> dict:
    import torch

    import lensbench as lb
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    texts = [t[:CHARS] for t in (lb.sample_texts() * n_texts)[:n_texts]]
    kw = dict(CONFIGS[name])
    with tempfile.TemporaryDirectory() as off:
        if kw:
            kw["offload_folder"] = off
        before = proc_status()["RssAnon"]
        t0 = time.perf_counter()
        with PeakRSS() as load_peak:
            m = lb.load(**kw)
        load_s = time.perf_counter() - t0
        held = proc_status()["RssAnon"]
        placement: dict[str, int] = {}
        for v in (getattr(m.model, "hf_device_map", None) or {"": "cpu"}).values():
            placement[str(v)] = placement.get(str(v), 0) + 1
        n_meta = sum(p.numel() for p in m.model.parameters() if p.device.type == "meta")
        n_all = sum(p.numel() for p in m.model.parameters())
        ops = {
            "capture (all layers, kept)": lambda: m.capture(texts, progress=False),
            "logit_lens": lambda: lb.logit_lens(m, texts, progress=False),
        }
        res = {"config": name, "load_s": load_s, "anon_before_load": before, "anon_held": held,
               "load_peak_anon": load_peak.anon, "placement": placement, "offloaded_params": n_meta / n_all,
               "fingerprint": m.fingerprint, "n_tokens": sum(len(m.encode(t)) for t in texts), "ops": {}}
        for op, fn in ops.items():
            fn()  # warm-up
            times, peaks, files = [], [], []
            for _ in range(rounds):
                base = proc_status()["RssAnon"]
                with PeakRSS() as p:
                    t = time.perf_counter()
                    out = fn()
                    times.append(time.perf_counter() - t)
                peaks.append(p.anon - base)
                files.append(p.file)
                del out
            res["ops"][op] = {"s": statistics.median(times), "times": times, "working_set": max(peaks),
                              "peak_file": max(files)}
        r = lb.logit_lens(m, texts[:2], progress=False)
        res["check"] = [float(x.kl_to_final.double().sum()) for x in r]
    return res


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def main(argv=None) -> None:
    ap = parser(__doc__, HERE / "RESULTS-offload.md", quick="1 round, 3 texts, two configurations")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=16)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.texts = 1, 3
    if a.child:
        emit(child(a.child, a.rounds, a.texts))
        return
    mach = machine_info()
    cmd = command("bench.bench_offload", argv)
    results = []
    for name in (QUICK if a.quick else CONFIGS):
        r = run_worker("bench.bench_offload", ["--child", name, "--rounds", str(a.rounds), "--texts", str(a.texts)],
                       env={"HF_HUB_OFFLINE": "1"})
        if "error" in r:
            raise SystemExit(f"{name} failed: {r['error']}")
        r.pop("subprocess_s", None)
        results.append(r)
        print(name, json.dumps(results[-1]["ops"]), flush=True)
    base = results[0]
    lines = [
        "# Offloaded vs unsplit: capture and logit lens (default model)", "",
        f"`{cmd}` ({'--quick' if a.quick else f'{a.rounds} rounds'}, {a.texts} texts of "
        f"`lb.sample_texts` cut to {CHARS} characters = {base['n_tokens']} tokens; torch threads "
        f"{os.environ.get('BENCH_THREADS', '2')}). {machine_line(mach)} Model: SmolLM2-135M-Instruct float32 "
        "(≈ 540 MB of weights, tied "
        "embedding ≈ 113 MB). Each configuration is a fresh process. Memory from /proc/self/status: *held* = RssAnon "
        "after load (the model plus accelerate's maps), *working set* = peak RssAnon during the call minus the "
        "RssAnon just before it, *file* = peak RssFile (memory-mapped weight files, reclaimable page cache).", "",
        "| configuration | placement (modules) | params offloaded | held | load s | op | s (median) | × unsplit | "
        "working set | Δ working set vs unsplit | file |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for op, v in r["ops"].items():
            b = base["ops"][op]
            lines.append(
                f"| {r['config']} | {', '.join(f'{k}: {n}' for k, n in r['placement'].items())} | "
                f"{r['offloaded_params']:.0%} | {mb(r['anon_held'])} | {r['load_s']:.1f} | {op} | {v['s']:.2f} | "
                f"{v['s'] / b['s']:.2f} | {mb(v['working_set'])} | {mb(v['working_set'] - b['working_set'])} | "
                f"{mb(v['peak_file'])} |")
    same = all(r["check"] == base["check"] and r["fingerprint"] == base["fingerprint"] for r in results)
    lines += ["", f"Same numbers: logit-lens KL sums and fingerprints of every configuration equal the unsplit "
              f"model's: **{same}**."]
    write_results(a.out, lines, cmd, {"machine": mach, "configurations": results},
                  json_path=a.out.with_name("results-offload.json"))


if __name__ == "__main__":
    main()
