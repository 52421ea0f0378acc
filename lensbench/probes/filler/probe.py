"""The filler probe: per-layer logistic probes on the residual stream at filler positions predicting each item's
answer, vs a like-for-like comparison position that has seen the same question, and a shuffled-label control.
The forwards run through :func:`lensbench.engine.run_batches` and the model's backend
(:func:`lensbench.capture.forward_batch`); each batch is reduced to one feature vector per run and layer.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from ...capture import forward_batch
from ...engine import run_batches
from ...errors import InputError
from ...model import LensModel
from ...plots.filler import probe_figure
from ...results import Result
from ...validation import Interval, Options, validate_params
from ._common import SHARED_PARAMS, _ids
from .sweep import _filler_ids, _normalize_sweep_items

#: the three probes of :func:`filler_probe`: ``{arm}_acc`` / ``{arm}_std`` of :class:`FillerProbeResult`
PROBE_ARMS = ("filler", "question", "shuffled")


@dataclasses.dataclass(eq=False)
class FillerProbeResult(Result):
    """Per-layer cross-validated accuracy of logistic probes predicting the answer from the residual stream.

    Attributes:
        layers: probed layers. filler_acc, question_acc, shuffled_acc: ``[n_layers]`` mean CV accuracy at the
            filler positions, at the comparison position (``compare``), and at filler positions with shuffled
            labels (:data:`PROBE_ARMS`). filler_std, question_std, shuffled_std: their std over folds.
            majority: majority-class rate.
        labels: the label of every item (strings); n_fillers, filler, pool (filler side: ``"mean"``/``"last"``);
        compare: what the filler positions are compared with (see :func:`filler_probe`); settings; model_name.

    ``to_dataframe()``: one row per layer: ``layer``, ``filler_acc``, ``question_acc``, ``shuffled_acc``,
    ``filler_std``, ``question_std``, ``shuffled_std``, ``majority``, ``n_items``, ``folds``, ``compare``.
    """

    layers: list
    filler_acc: torch.Tensor
    question_acc: torch.Tensor
    shuffled_acc: torch.Tensor
    filler_std: torch.Tensor
    question_std: torch.Tensor
    shuffled_std: torch.Tensor
    majority: float
    labels: list
    n_fillers: int
    filler: str
    pool: str = "mean"
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    compare: str = "last_question"

    def to_dataframe(self):
        import pandas as pd
        cols = {f"{arm}_{stat}": getattr(self, f"{arm}_{stat}").numpy() for stat in ("acc", "std")
                for arm in PROBE_ARMS}
        return pd.DataFrame({"layer": self.layers, **cols, "majority": self.majority, "n_items": len(self.labels),
                             "folds": self.settings.get("folds"), "compare": self.compare})

    def figure(self):
        """CV accuracy per layer of the three probes (:func:`lensbench.plots.filler.probe_figure`)."""
        return probe_figure(self)


PROBE_COMPARE = ("last_question", "no_filler", "question_mean")
_FILLER_PROBE_PARAMS = {
    **SHARED_PARAMS,
    "filler": [str],
    "n_fillers": [Interval(int, 1, None)],
    "template": [None, str],
    "label": [None, "callable"],
    "pool": [Options({"mean", "last"})],
    "compare": [Options(PROBE_COMPARE)],
    "folds": [Interval(int, 2, None)],
    "C": [Interval(float, 0, None, closed="neither")],
}


@validate_params(_FILLER_PROBE_PARAMS)
def filler_probe(m: LensModel, items, *, filler: str = " .", n_fillers: int = 16, layers=None,
                 template: str | None = None, label=None, pool: str = "mean", compare: str = "last_question",
                 folds: int = 5, seed: int = 0, C: float = 1.0, batch_size: int | str = "auto",
                 progress: bool = True) -> FillerProbeResult:
    """Logistic probes (scikit-learn) per layer on the residual at filler positions predicting each item's label
    (``item["meta"]["label"]`` when present, else the answer string), vs a like-for-like comparison position and
    shuffled labels.

    The input is ``question + n_fillers × filler`` (+ ``template`` if given). Filler side: ``pool`` =
    ``"mean"`` over the filler positions or ``"last"`` (the last filler). Every filler position has seen the
    whole question, so the comparison must have too ("Let's Think Dot by Dot" asks what the filler positions
    add to what the model already has after reading the question):

    * ``compare="last_question"`` (default): the last question token, which has seen exactly the whole question
      (causal attention: it is the same state as the last position of the question run without fillers);
    * ``"no_filler"``: the last position of ``question + template`` run *without* fillers — the state the
      no-filler arm predicts the answer from (equals ``"last_question"`` when ``template`` is None);
    * ``"question_mean"``: the mean over the question positions after BOS, the old behaviour. Not
      like-for-like: early positions have seen only a prefix, and at layer 0 the mean holds the label word's own
      embedding, so it decodes labels the fillers could never see in the embeddings.

    Stratified ``folds``-fold CV, seeded; ``*_std`` is the std over folds. ``batch_size``: runs per forward
    pass or ``"auto"`` (a token budget, halved on out-of-memory); the features do not depend on it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    items = _normalize_sweep_items(items)
    n_fillers, folds = int(n_fillers), int(folds)
    layers = m.check_layers(layers)
    if label is None:
        labels = [str(it.get("meta", {}).get("label", it["answer"])) if isinstance(it.get("meta"), dict)
                  else it["answer"] for it in items]
    else:
        labels = [str(label(it)) for it in items]
    y = np.asarray(labels)
    classes, cnt = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"filler_probe needs at least two distinct labels, got only {classes.tolist()}.")
    if cnt.min() < folds:
        raise InputError(f"the rarest label has {int(cnt.min())} items, fewer than folds={folds}; pass more items "
                         "or fewer folds.")
    t = _ids(m, template, bos=False, param="template") if template else []
    # one run per item (two with compare="no_filler"): (ids, [(feature key, (start, end)), ...])
    runs = []
    for i, it in enumerate(items):
        q = _ids(m, it["question"], bos=True, param=f"items[{i}]['question']")
        f = _filler_ids(m, filler, n_fillers, it, random.Random(f"{seed}:{i}"))
        fs, fe = len(q), len(q) + len(f)
        spec = [("f", (fs, fe) if pool == "mean" else (fe - 1, fe))]
        if compare == "last_question":
            spec.append(("q", (len(q) - 1, len(q))))
        elif compare == "question_mean":
            spec.append(("q", (1 if len(q) > 1 else 0, len(q))))
        runs.append((i, q + f + t, spec))
        if compare == "no_filler":
            runs.append((i, q + t, [("q", (len(q + t) - 1, len(q + t)))]))
    feats = {key: {la: [None] * len(items) for la in layers} for key in ("f", "q")}
    ids = [torch.tensor(s, dtype=torch.long) for _, s, _ in runs]

    def step(idx: list[int]) -> None:
        batch = forward_batch(m, [ids[b] for b in idx], layers, indices=idx, logits=False)
        for r, b in enumerate(idx):   # right padding: causal positions are unaffected
            i, _, spec = runs[b]
            for key, (s0, s1) in spec:
                for la in layers:
                    feats[key][la][i] = batch.hidden[la][r, s0:s1].float().mean(0).cpu().numpy()

    run_batches(m, ids, step, batch_size=batch_size, progress=progress, desc="filler probe")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    y_shuf = np.random.default_rng(seed).permutation(y)
    res = {k: [] for k in ("f", "q", "s")}
    for la in layers:
        Xf, Xq = np.stack(feats["f"][la]), np.stack(feats["q"][la])
        for key, X, yy in (("f", Xf, y), ("q", Xq, y), ("s", Xf, y_shuf)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            sc = cross_val_score(clf, X, yy, cv=cv)
            res[key].append((sc.mean(), sc.std()))
    tt = {k: (torch.tensor([a for a, _ in v], dtype=torch.float32),
              torch.tensor([s for _, s in v], dtype=torch.float32)) for k, v in res.items()}
    return FillerProbeResult(layers=layers, filler_acc=tt["f"][0], question_acc=tt["q"][0], shuffled_acc=tt["s"][0],
                             filler_std=tt["f"][1], question_std=tt["q"][1], shuffled_std=tt["s"][1],
                             majority=float(cnt.max() / cnt.sum()), labels=labels, n_fillers=n_fillers,
                             filler=filler, pool=pool, compare=compare,
                             settings={"folds": folds, "seed": seed, "C": C, "compare": compare},
                             model_name=m.name)
