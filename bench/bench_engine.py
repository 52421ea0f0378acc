"""Every public probe's wall time on the default model, for two source trees in one run (before/after a change).

    python -m bench.bench_engine                      # this working tree vs the tree at --before
    python -m bench.bench_engine --before 7fb59cc     # the commit before the one-engine refactor
    python -m bench.bench_engine --quick              # 1 round, smaller workloads

The ``before`` tree is a ``git worktree`` of that revision in a temporary folder. Each round runs one subprocess
per tree (alternating which goes first), started in that tree, whose folder then comes first on ``sys.path`` so
that it imports that tree's lensbench; a subprocess loads the model once, warms every probe up once, then
times each probe once. A probe's time per tree is the median over rounds; the ratio after/before > 1.05 is
flagged as a regression. Only public ``lb.`` names are called, so both trees run the same script. Writes
``bench/RESULTS-engine.md`` and ``bench/results-engine.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._harness import HERE, MARK, ROOT, command, machine_info, machine_line, parser, write_results

WORKER = r'''
import json, sys, time, warnings
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(int(sys.argv[2]))
import lensbench as lb
quick = sys.argv[1] == "1"
m = lb.load()
texts = [t[:600] for t in lb.sample_texts()[:4]]
prompt = "The capital of France is"
items = lb.tasks.factual(style="cloze")[:3 if quick else 6]
resp_prompt = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"
cases = {
    "logit_lens": lambda: lb.logit_lens(m, texts[0], progress=False),
    "lens_sweep": lambda: lb.lens_sweep(m, texts, progress=False),
    "intrinsic_dimension": lambda: lb.intrinsic_dimension(m, texts, progress=False),
    "linearity": lambda: lb.linearity(m, texts, progress=False),
    "contextual_memory": lambda: lb.contextual_memory(m, texts[:2], progress=False),
    "attribute_ig": lambda: lb.attribute(m, prompt, method="integrated_gradients", progress=False),
    "attribute_occlusion": lambda: lb.attribute(m, prompt, method="occlusion", progress=False),
    "faithfulness": lambda: lb.faithfulness(m, lb.attribute(m, prompt, method="grad_x_input", progress=False),
                                            n_samples=8),
    "filler_ablation": lambda: lb.filler_ablation(m, texts[:2], n_control=1, progress=False),
    "filler_sweep": lambda: lb.filler_sweep(m, items, counts=(0, 8, 32), progress=False),
    "critical_tokens": lambda: lb.critical_tokens(m, resp_prompt, " 7 apples.", checker=lb.checkers.number(8),
                                                  n_samples=8 if quick else 16, max_new_tokens=8,
                                                  progress=False),
}
out = {}
for name, f in cases.items():
    try:
        f()
    except Exception as e:  # noqa: BLE001
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        continue
    t0 = time.perf_counter()
    f()
    out[name] = {"seconds": time.perf_counter() - t0}
print(sys.argv[3] + json.dumps(out))
'''


def run_tree(tree: Path, quick: bool, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", WORKER, "1" if quick else "0", str(threads), MARK], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith(MARK)), None)
    if line is None:
        raise SystemExit(f"benchmark worker failed in {tree}:\n{p.stderr[-3000:]}")
    return json.loads(line[len(MARK):])


def main() -> None:
    ap = parser(__doc__, HERE / "RESULTS-engine.md", quick="1 round, smaller workloads")
    ap.add_argument("--before", default="7fb59cc", help="git revision of the 'before' tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    mach = machine_info()
    rounds = 1 if a.quick else a.rounds
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), a.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            t0 = time.time()
            for r in range(rounds):
                order = [("before", before), ("after", ROOT)]
                for name, tree in (order if r % 2 == 0 else order[::-1]):
                    runs[name].append(run_tree(tree, a.quick, a.threads))
            wall = time.time() - t0
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    probes = list(runs["after"][0])
    rows, table = [], {}
    for p in probes:
        def med(name, p=p):
            xs = [r[p]["seconds"] for r in runs[name] if "seconds" in r.get(p, {})]
            return statistics.median(xs) if xs else None
        b, f = med("before"), med("after")
        ratio = f / b if b and f else None
        err = next((r[p]["error"] for r in runs["after"] + runs["before"] if "error" in r.get(p, {})), "")
        table[p] = {"before_s": b, "after_s": f, "ratio": ratio, "error": err}
        flag = "" if ratio is None else ("regression" if ratio > 1.05 else "ok")
        rows.append(f"| {p} | {b if b is None else f'{b:.2f}'} | {f if f is None else f'{f:.2f}'} | "
                    f"{'—' if ratio is None else f'{ratio:.2f}'} | {flag or err} |")
    cmd = command("bench.bench_engine", ["--before", a.before, *(["--quick"] if a.quick else []),
                                         "--rounds", str(rounds), "--threads", str(a.threads)])
    md = [f"# Probe wall times before/after the one-engine refactor (`{a.before}` vs this tree)", "",
          f"Command (from the repository root): `{cmd}`  ",
          f"Machine: {machine_line(mach, os.getloadavg())} Probes run with {a.threads} torch threads; default model "
          f"(SmolLM2-135M-Instruct, float32); rounds {rounds} (median of per-round single timings after one "
          f"warm-up); whole run {wall:.0f} s.", "",
          "| probe | before (s) | after (s) | after/before | verdict (> 1.05 = regression) |",
          "|---|---:|---:|---:|---|", *rows, ""]
    write_results(a.out, md, cmd, {"before": a.before, "rounds": rounds, "probes": table, "raw": runs,
                                   "machine": mach}, json_path=a.out.with_name("results-engine.json"))


if __name__ == "__main__":
    main()
