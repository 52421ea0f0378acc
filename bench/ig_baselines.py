"""Measure the integrated-gradients completeness gap of each baseline candidate.

For every candidate baseline and prompt, at the default ``n_steps=50`` (Gauss-Legendre), report
gap = Σ attr − (F(x) − F(x')) and gap / |F(x) − F(x')|, with F(x) and F(x') recomputed by a plain forward of
the raw HF model (not lensbench's own numbers). Runs on the default model (SmolLM2-135M-Instruct) and on
every tiny architecture of ``lensbench.testing.ARCHITECTURES``; writes bench/RESULTS-ig-baselines.md.

    HF_HUB_OFFLINE=1 python -m bench.ig_baselines [--quick]    # --quick: the tiny architectures only
"""

from __future__ import annotations

import time
import warnings

import torch

import lensbench as lb
from bench._harness import HERE, command, machine_info, machine_line, parser, write_results
from lensbench.probes.attribution import DEFAULT_BASELINE, GAP_TOLERANCE
from lensbench.testing import ARCHITECTURES, tiny_model

CANDIDATES = ["zero", "mean", "pad", "mean_first", "pad_first", "context_mean_first", "scaled_mean_first"]
PROMPTS = ["The capital of France is", "The Eiffel Tower is a famous landmark in the city of",
           "When Mary and John went to the store, John gave a drink to"]
NOTE = """
Reading: `passes` needs every model; no candidate passes on the architectures whose output is not smooth in the
embeddings (hard top-k expert routing: mixtral, olmoe, deepseek_v3; xLSTM's max-stabilised exponential gating;
deepseek_v4's hash routing needs input_ids, so no gradient method runs): there lensbench warns
(`CompletenessWarning`). Over the default model and every other architecture, `scaled_mean_first` is the only
candidate within 5% (worst 4.8% on the default model, 4.9% on opt_project_out), hence the default
(`lensbench.probes.attribution.DEFAULT_BASELINE`). Captum's `zero` misses by up to 1189% on the default model.
"""
TINY_PROMPTS = ["The capital of France is", "Hello world, hello lens. Numbers: 12 + 30 ="]


def reference_delta(m, res) -> float:
    """F(x) − F(x') by plain forwards of the raw HF model on the recorded baseline embeddings."""
    P = res.target_positions[0]
    y = int(res.target_ids[0])
    with torch.no_grad():
        x = m.model.get_input_embeddings()(res.input_ids[None, :P].to(m.input_device)).float()
        xb = res.baseline_embeds[0, :P][None].to(x.device)
        lp = [torch.log_softmax(m.model(inputs_embeds=z.to(m.model.dtype), use_cache=False).logits[0, -1].float(),
                                -1)[y] for z in (x, xb)]
    return float(lp[0] - lp[1])


def measure(m, prompts, label):
    rows = []
    for p in prompts:
        for c in CANDIDATES:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = lb.attribute(m, p, baseline=c, n_steps=50, progress=False)
            except Exception as e:  # noqa: BLE001 - e.g. no pad token; hash-routed MoE needs input_ids
                rows.append((label, p, c, float("nan"), float("nan"), float("nan"), type(e).__name__ + ": " + str(e)[:40].replace("|", "/")))
                continue
            note = ""
            try:
                dF = reference_delta(m, r)
            except Exception:  # noqa: BLE001 - e.g. hash-routed MoE needs input_ids: lensbench's F(x), F(x')
                dF, note = float(r.f_value[0] - r.f_baseline[0]), " (F from lensbench)"
            gap = float(r.scores[0].nansum()) - dF
            rows.append((label, p, c, dF, gap, gap / abs(dF), f"{time.perf_counter() - t0:.1f}s{note}"))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = parser(__doc__, HERE / "RESULTS-ig-baselines.md", quick="the tiny architectures only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mach = machine_info()
    cmd = "HF_HUB_OFFLINE=1 " + command("bench.ig_baselines", argv)
    rows = []
    if not args.quick:
        rows += measure(lb.load(), PROMPTS, "default (SmolLM2-135M)")
    for arch in ARCHITECTURES:
        rows += measure(lb.load(*tiny_model(arch)), TINY_PROMPTS, arch)
    worst = {}
    for label, _p, c, _dF, _gap, rel, _ in rows:
        if rel == rel:
            worst.setdefault(c, {}).setdefault(label, 0.0)
            worst[c][label] = max(worst[c][label], abs(rel))
    labels = list(dict.fromkeys(r[0] for r in rows))
    lines = ["# Integrated gradients: completeness gap per baseline", "",
             f"`{cmd}` (from the repository root; n_steps=50, Gauss-Legendre; F = log p of the",
             "greedy next token; F(x), F(x') from plain forwards of the raw HF model on the recorded baseline). "
             f"Tolerance: |gap| <= {GAP_TOLERANCE:.0%} of |F(x) - F(x')|. Current default: `{DEFAULT_BASELINE}`.",
             "", machine_line(mach),
             "", "## Worst |gap| / |F(x) - F(x')| per model (over its prompts)", "",
             "| baseline | " + " | ".join(labels) + " | max | passes |",
             "|---|" + "---|" * (len(labels) + 2)]
    for c in CANDIDATES:
        w = [worst.get(c, {}).get(lbl, float("nan")) for lbl in labels]
        mx = max((v for v in w if v == v), default=float("nan"))
        lines.append(f"| `{c}` | " + " | ".join(f"{v:.1%}" for v in w) + f" | {mx:.1%} | "
                     + ("yes" if mx <= GAP_TOLERANCE else "no") + " |")
    lines += NOTE.splitlines()
    lines += ["", "## Every measurement", "", "| model | prompt | baseline | F(x) - F(x') | gap | gap / dF | time |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b[:32]!r} | `{c}` | {d:.3f} | {e:+.4f} | {f:+.2%} | {g} |" for a, b, c, d, e, f, g in rows]
    write_results(args.out, lines, cmd, echo=False)
    print("\n".join(lines[:len(CANDIDATES) + 10]))


if __name__ == "__main__":
    main()
