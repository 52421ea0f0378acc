"""Self-contained offline HTML report (plotly embedded once, no network) plus a results folder.

Each probe contributes a section function ``(m, ctx) -> list[(title, html)]``; sections run in order.
"""

from __future__ import annotations

import html
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .model import LensModel

Section = Callable[[LensModel, dict], list[tuple[str, str]]]


def _fig_html(fig) -> str:
    return fig.to_html(include_plotlyjs=False, full_html=False)


def model_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:
    n_params = sum(p.numel() for p in m.model.parameters())
    card = {
        "model": m.name, "architecture": type(m.model).__name__, "parameters": f"{n_params / 1e6:.1f} M",
        "layers (L)": m.n_layers, "d_model": m.d_model, "vocab": m.vocab_size, "device": str(m.device),
        "dtype": str(m.dtype), "backend": m.backend, "max length": m.max_length,
        "torch": torch.__version__, "python": platform.python_version(),
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in card.items())
    out = [("Model", f"<table>{rows}</table>"),
           ("Anatomy and load-time validation", f"<pre>{html.escape(str(m.anatomy))}</pre>")]
    texts = ctx["texts"]
    t0 = time.perf_counter()
    from .capture import windows
    cap = m.capture(windows(m, texts, ctx["max_tokens"], max_windows_per_text=1), progress=ctx.get("progress", True))
    dt = time.perf_counter() - t0
    norms = torch.stack([cap.hidden_states(i).norm(dim=-1).mean(-1) for i in range(len(cap))]).mean(0)
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=list(range(m.n_layers + 1)), y=norms.tolist(), mode="lines+markers"))
    fig.update_layout(title="mean residual-stream norm per layer", xaxis_title="layer", yaxis_title="‖h‖",
                      height=340)
    stats = dict(cap.stats, seconds=round(dt, 2), tokens_per_second=round(cap.stats["tokens"] / dt, 1))
    ctx["results"]["capture_stats"] = stats
    out.append(("Capture statistics", f"<pre>{html.escape(json.dumps(stats, indent=1))}</pre>" + _fig_html(fig)))
    return out


def lens_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:
    from .probes.lens import lens_sweep, logit_lens
    res = logit_lens(m, ctx["prompt"], progress=False)
    res.save(ctx["outdir"] / "lens_prompt.safetensors")
    sweep = lens_sweep(m, ctx["texts"], max_tokens_per_text=ctx["max_tokens"], progress=ctx.get("progress", True))
    sweep.save(ctx["outdir"] / "lens_sweep.safetensors")
    sweep.to_dataframe().to_csv(ctx["outdir"] / "lens_sweep.csv", index=False)
    return [("Logit lens: one prompt", _fig_html(res.figure())),
            ("Logit lens over the sample texts", _fig_html(sweep.figure("kl_to_final"))
             + _fig_html(sweep.figure("ce_next")))]


def geometry_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:

    from .capture import windows
    from .probes.geometry import (
        geometry_loss_correlation,
        intrinsic_dimension,
        linearity,
        neighborhood_overlap,
    )
    texts = windows(m, ctx["texts"], ctx["max_tokens"] * 2, max_windows_per_text=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idr = intrinsic_dimension(m, texts, progress=False)
        ov = neighborhood_overlap(m, texts, k=5, progress=False)
        lin = linearity(m, texts, progress=False)
    idr.save(ctx["outdir"] / "geometry_id.safetensors")
    lin.save(ctx["outdir"] / "geometry_linearity.safetensors")
    out = [("Geometry: intrinsic dimension per layer (GRIDE, per prompt)", _fig_html(idr.figure())),
           ("Geometry: neighbourhood overlap of adjacent layers", _fig_html(ov.figure())),
           ("Geometry: layer-to-layer linearity", _fig_html(lin.figure()) + _fig_html(lin.figure("per_token")))]
    if len(texts) >= 3:
        corr = geometry_loss_correlation(idr)
        out.append(("Geometry: log-ID vs loss across prompts", _fig_html(corr.figure())))
    ctx["results"]["geometry"] = {"id_peak_layer": int(idr.values.mean(0)[1:].argmax() + 1),
                                  "mean_linearity": float(lin.score.mean())}
    return out


def attribution_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:
    from .plots import attribution_html
    from .probes.attribution import attribute, faithfulness
    prompt = ctx["prompt"]
    methods = ["saliency", "grad_x_input", "integrated_gradients", "occlusion", "rollout"]
    rows, parts = [], []
    for meth in methods:
        # integrated gradients: its default baseline and n_steps=50; the table shows which baseline
        # and its completeness gap, absolute and relative to |F(x) - F(x')|
        r = attribute(m, prompt, method=meth, progress=False)
        r.save(ctx["outdir"] / f"attribution_{meth}.safetensors")
        f = faithfulness(m, r, n_samples=8)
        gap = ("" if r.relative_gap is None else
               f"{float(r.completeness[0]):+.3f} ({float(r.relative_gap[0]):+.1%} of |ΔF|)")
        rows.append((meth, f["sufficiency_mean"], f["comprehensiveness_mean"], f["sufficiency_ratio"],
                     f["comprehensiveness_ratio"], r.baseline or "—", gap or "—"))
        parts.append(attribution_html(r))
    table = ("<table><tr><th>method</th><th>soft sufficiency</th><th>soft comprehensiveness</th><th>suff. / random"
             "</th><th>comp. / random</th><th>baseline</th><th>IG completeness gap</th></tr>"
             + "".join(f"<tr><td>{a}</td><td>{b:.3f}</td><td>{c:.3f}</td><td>{d:.2f}</td><td>{e:.2f}</td>"
                       f"<td>{html.escape(bl)}</td><td>{g}</td></tr>" for a, b, c, d, e, bl, g in rows) + "</table>")
    gen = attribute(m, prompt, method="grad_x_input", generate=4 if ctx["max_tokens"] < 100 else 8, progress=False)
    ctx["results"]["attribution"] = {r[0]: {"sufficiency": r[1], "comprehensiveness": r[2], "baseline": r[5],
                                            "completeness_gap": r[6]} for r in rows}
    return [("Attribution: methods side by side, with faithfulness", table + "<br>".join(parts)),
            ("Attribution of a greedy generation (grad × input)", _fig_html(gen.figure()))]


SECTIONS: list[Section] = [model_section, lens_section, geometry_section, attribution_section]

def filler_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:
    """Small filler-token section: class ablation on 2-3 shipped texts (cut to the report's token budget) and a
    filler sweep on a few shipped factual items."""
    from .probes.filler import filler_ablation, filler_sweep
    from .tasks import factual
    quick = ctx["max_tokens"] < 100
    texts = [t[: ctx["max_tokens"] * 4] for t in ctx["texts"][: 2 if quick else 3]]
    abl = filler_ablation(m, texts, classes=("punctuation", "stopwords", "articles"), n_control=1 if quick else 2,
                          continuation_words=12, progress=False)
    abl.save(ctx["outdir"] / "filler_ablation.safetensors")
    items = factual(style="cloze")[:: 40 if quick else 12][: 4 if quick else 12]
    sw = filler_sweep(m, items, fillers=(" .", "random_words"), counts=(0, 4, 16) if quick else (0, 8, 32),
                      progress=False)
    sw.save(ctx["outdir"] / "filler_sweep.safetensors")
    ctx["results"]["filler"] = {
        "ablation": {r["class"]: {"delta_loss": r["delta_loss"], "control_delta_loss": r["control_delta_loss"]}
                     for r in abl.summary()},
        "sweep": [{"kind": r["kind"], "count": r["count"], "delta_logprob": r.get("delta_logprob")}
                  for r in sw.summary()]}
    return [("Filler tokens: removing a token class vs removing as many random tokens",
             _fig_html(abl.figure()) + abl.to_dataframe().round(3).to_html(index=False)),
            ("Filler tokens: answer log-probability after N filler tokens", _fig_html(sw.figure()))]


SECTIONS.append(filler_section)

def critical_section(m: LensModel, ctx: dict) -> list[tuple[str, str]]:
    """Rollout criticality of a deliberately wrong arithmetic answer (small sample counts; coarse search)."""
    from .probes.critical import checkers, critical_html, critical_tokens
    quick = ctx["max_tokens"] < 100
    prompt = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"
    response = " Tom has 3 + 5 = 9 apples. The answer is 9."
    # a report has seconds, not the 64 rollouts per prefix the powered rule needs: use the paper's point rule
    # and print its false-positive rate at this n (res.decision) next to the verdict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = critical_tokens(m, prompt, response, checker=checkers.number(8), n_samples=3 if quick else 8,
                              max_new_tokens=6 if quick else 16, temperature=0.7, search="coarse",
                              stride=4 if quick else 2, seed=0, rule="paper", progress=ctx.get("progress", False))
    res.save(ctx["outdir"] / "critical_tokens.safetensors")
    crit = res.critical_index
    ctx["results"]["critical"] = {"critical_index": crit, "critical_token": None if crit is None else res.units[crit],
                                  "base_accuracy": res.base_accuracy, "evaluated": len(res.evaluated),
                                  "n_samples": res.n_samples}
    note = (f"<p>Prompt {html.escape(repr(prompt))}, wrong response {html.escape(repr(response))}, checker "
            f"<code>number(8)</code>; {res.n_samples} continuations per arm, coarse-to-fine search "
            f"({len(res.evaluated)} of {len(res.units)} tokens evaluated). Critical token: "
            + ("none" if crit is None else f"{crit} <code>{html.escape(repr(res.units[crit]))}</code>")
            + f". Decision: {html.escape(str(res.decision.get('text', '')))}"
            + ". Colour: accuracy drop caused by each token.</p>")
    return [("Critical tokens: rollouts of a wrong arithmetic answer",
             note + critical_html(res) + _fig_html(res.figure()))]


SECTIONS.append(critical_section)


def write_report(m: LensModel, out: str | Path = "out/report.html", *, quick: bool = False,
                 texts: list[str] | None = None, prompt: str = "The capital of France is",
                 progress: bool = True) -> Path:
    """Run every probe section on ``m`` and write one offline HTML file; arrays go to ``<out>_results/``."""
    from plotly.offline import get_plotlyjs

    from .data import sample_texts
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outdir = out.with_name(out.stem + "_results")
    outdir.mkdir(parents=True, exist_ok=True)
    texts = texts or sample_texts(3 if quick else 12)
    ctx = {"texts": texts, "prompt": prompt, "max_tokens": 48 if quick else 128, "outdir": outdir,
           "results": {}, "progress": progress}
    from tqdm.auto import tqdm
    parts, seconds = [], {}
    bar = tqdm(SECTIONS, desc="report", unit="section", disable=not progress)
    for section in bar:
        name = section.__name__.removesuffix("_section")
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            parts += section(m, ctx)
        except Exception as e:  # a failing section is reported in the page, the rest still runs
            parts.append((f"{section.__name__} failed", f"<pre>{html.escape(repr(e))}</pre>"))
        seconds[name] = round(time.perf_counter() - t0, 2)
    bar.close()
    ctx["results"]["section_seconds"] = seconds
    (outdir / "summary.json").write_text(json.dumps(ctx["results"], indent=1))
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{h}</section>" for t, h in parts)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lensbench report: {html.escape(m.name)}"
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}th{text-align:left;"
            "padding-right:1em}section{margin:2em 0}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>lensbench report</h1><p>{html.escape(m.name)} · {time.strftime('%Y-%m-%d %H:%M')}"
            f"{' · quick' if quick else ''}</p>{body}</body></html>")
    out.write_text(page, encoding="utf-8")
    return out
