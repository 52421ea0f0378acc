"""``CriticalTokenExplorer``: the response with each token (or sentence) coloured by criticality (rollout drop,
keep − replace, or 1 − p_ce from a contrastive estimate), the success-rate curve of both arms over positions with
Wilson bands, and — click a token — the sampled continuations from there, kept vs replaced, with their verdicts.

The rollouts run once (:func:`lensbench.critical_tokens`) at construction, or pass a finished ``result=``;
clicking and switching the colouring redraw from that result and never run the model.
"""

from __future__ import annotations

import html
import math

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

import lensbench as lb
from lensbench.plots import critical_figure

from ._chrome import USER_ERRORS, error_html, placeholder_html
from ._figsync import SyncedVBox

COLOURINGS = {
    "rollout drop": "criticality",
    "keep − replace": "counterfactual_importance",
    "1 − p_ce (contrastive)": "contrastive",
}


def _verdict(ok: bool) -> str:
    return ("<span style='color:#1a7f37;font-weight:bold'>✓</span>" if ok
            else "<span style='color:#b00;font-weight:bold'>✗</span>")


class CriticalTokenExplorer(SyncedVBox):
    """Critical tokens of one response.

    Args:
        m: a :class:`lensbench.LensModel` (may be None when ``result`` is given); prompt, response: the texts.
        checker: answer checker for :func:`lensbench.critical_tokens` (e.g. ``lb.checkers.number(8)``).
        result: an existing :class:`lensbench.CriticalTokensResult` (then nothing is sampled).
        contrastive: an optional :class:`lensbench.ContrastiveResult` over prompt + response, enabling the
            "1 − p_ce" colouring (its last tokens are aligned to the response's tokens).
        **critical_kw: passed to :func:`lensbench.critical_tokens` (n_samples, max_new_tokens, search, ...).

    Attributes:
        result: the CriticalTokensResult; token_buttons: one button per unit; selected: the clicked unit.
    """

    def __init__(self, m=None, prompt: str | None = None, response: str | None = None, *, checker=None,
                 result=None, contrastive=None, max_shown: int = 8, **critical_kw):
        self.m = m
        self.error = W.HTML("")
        self.result = result
        self.contrastive = contrastive
        self.max_shown = max_shown
        if self.result is None:
            try:
                critical_kw.setdefault("progress", False)
                self.result = lb.critical_tokens(m, prompt, response, checker=checker, **critical_kw)
            except USER_ERRORS as e:
                self.error.value = error_html(e)
        options = [k for k, v in COLOURINGS.items() if v != "contrastive" or contrastive is not None]
        self.colour = W.Dropdown(options=options, value=options[0], description="colour by")
        self.colour.add_class("lb-crit-colour")
        self.summary = W.HTML("")
        self.tokens_box = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", align_items="center"))
        self.tokens_box.add_class("lb-crit-tokens")
        self.curve = go.FigureWidget()
        self.curve.layout.height = 360
        self.detail = W.HTML(placeholder_html("click a token to see its sampled continuations"))
        self.detail.add_class("lb-crit-continuations")
        self.token_buttons: list[W.Button] = []
        self.selected: int | None = None
        self.colour.observe(lambda _c: self.recolour(), names="value")
        super().__init__([self.error, self.summary, self.colour, self.tokens_box, self.curve, self.detail])
        self.add_class("lb-critical-explorer")
        if self.result is not None:
            self._build()

    # ---- construction
    def _build(self) -> None:
        res = self.result
        crit = res.critical_index
        self.summary.value = (
            f"<b>{len(res.units)} {res.granularity}s</b>, {res.n_samples} samples per arm · prompt-only accuracy "
            f"{res.base_accuracy:.2f} · critical {res.granularity}: "
            + ("none" if crit is None else f"<b>{crit}</b> <code>{html.escape(repr(res.units[crit]))}</code>")
            + (f"<br><small class='lb-crit-rule'>{html.escape(res.decision['text'])}</small>"
               if getattr(res, "decision", None) else ""))
        buttons = []
        for i, u in enumerate(res.units):
            label = u.replace("\n", "↵") if u.strip() else (u.replace(" ", "␣").replace("\n", "↵") or "∅")
            b = W.Button(description=label, layout=W.Layout(width="auto", height="28px", margin="1px",
                                                            padding="0 3px"))
            b.add_class("lb-crit-token")
            b.on_click(lambda _b, i=i: self.select(i))
            buttons.append(b)
        self.token_buttons = buttons
        self.tokens_box.children = buttons
        fig = critical_figure(res)
        with self.curve.batch_update():
            self.curve.data = []
            for tr in fig.data:
                self.curve.add_trace(tr)
            self.curve.layout = fig.layout
        self.recolour()

    def weights(self) -> np.ndarray:
        """Current colouring weight per unit in [0, 1] (NaN: not evaluated)."""
        res = self.result
        key = COLOURINGS[self.colour.value]
        if key == "contrastive":
            crit = (1 - self.contrastive.p_ce).numpy()
            w = np.full(len(res.units), np.nan)
            spans = res.unit_spans
            n_tok = spans[-1][1]
            tail = crit[-n_tok:] if len(crit) >= n_tok else np.concatenate([np.full(n_tok - len(crit), np.nan), crit])
            for i, (a, b) in enumerate(spans):
                w[i] = float(np.nanmax(tail[a:b])) if np.isfinite(tail[a:b]).any() else np.nan
            return w
        return np.clip(getattr(res, key).numpy(), 0, 1)

    def recolour(self) -> None:
        if self.result is None:
            return
        res = self.result
        w = self.weights()
        for i, b in enumerate(self.token_buttons):
            v = float(w[i])
            if math.isnan(v):
                b.style.button_color = "#f3f3f3"
            else:
                r, g, bl = 255, int(255 - 215 * v), int(255 - 215 * v)
                b.style.button_color = f"#{r:02x}{g:02x}{bl:02x}"
            b.tooltip = (f"{i}: keep {float(res.keep_acc[i]):.2f} · replace {float(res.replace_acc[i]):.2f} · "
                         f"{self.colour.value} {v:.2f}")
            if i == res.critical_index:
                b.add_class("lb-crit-critical")

    # ---- interaction
    def select(self, i: int) -> None:
        """Show the continuations sampled at unit ``i`` (kept vs replaced) with their verdicts."""
        res = self.result
        self.selected = i
        for j, b in enumerate(self.token_buttons):
            (b.add_class if j == i else b.remove_class)("lb-crit-selected")
            b.layout.border = "2px solid #1f5fbf" if j == i else ""
        cont = res.continuations_at(i)
        head = (f"<div class='lb-crit-unit' data-unit='{i}'><b>{res.granularity} {i}</b> "
                f"<code>{html.escape(repr(res.units[i]))}</code>")
        if cont is None:
            self.detail.value = head + " — not evaluated (coarse search skipped it)</div>"
            return
        keep_label = "kept" if res.granularity == "token" else "after the sentence"
        rep_label = "replaced (token forbidden)" if res.granularity == "token" else "resampled from before it"
        failing = ""
        if len(getattr(res, "failing", [])) == len(res.units):
            failing = f" · {'failing' if bool(res.failing[i]) else 'not failing'} under the rule"
        stats = (f" · keep {float(res.keep_acc[i]):.2f} [{float(res.keep_lo[i]):.2f}, {float(res.keep_hi[i]):.2f}]"
                 f" · replace {float(res.replace_acc[i]):.2f}{failing}</div>")
        rows = []
        k = self.max_shown
        firsts = cont.get("replace_first", [])
        dissim = cont.get("dissimilar") or [True] * len(cont["replace"])
        for j in range(min(k, max(len(cont["keep"]), len(cont["replace"])))):
            kt = cont["keep"][j] if j < len(cont["keep"]) else ""
            rt = cont["replace"][j] if j < len(cont["replace"]) else ""
            kv = _verdict(cont["keep_ok"][j]) if j < len(cont["keep"]) else ""
            rv = _verdict(cont["replace_ok"][j]) if j < len(cont["replace"]) else ""
            alt = f"<code>{html.escape(repr(firsts[j]))}</code> " if j < len(firsts) else ""
            faded = "" if j >= len(dissim) or dissim[j] else " style='opacity:0.45' title='similar: not counted'"
            rows.append(f"<tr><td class='lb-crit-keep'>{kv} {html.escape(kt[-240:])}</td>"
                        f"<td class='lb-crit-replace'{faded}>{rv} {alt}{html.escape(rt[-240:])}</td></tr>")
        self.detail.value = (head + stats + "<table style='width:100%;table-layout:fixed;font-size:12px'>"
                             f"<tr><th>{keep_label}</th><th>{rep_label}</th></tr>" + "".join(rows) + "</table>")
