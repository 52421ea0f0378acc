"""Contrastive estimation: per-token p_ce = softmax((1+β)·log p_pos − β·log p_neg)[y_t] between two models (or two
peft adapters of one base) teacher-forced on the same text, and the log-likelihood difference."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from tqdm.auto import tqdm

from ...capture import forward_batch
from ...devices import is_oom
from ...engine import check_cancelled
from ...errors import InputError
from ...model import LensModel, check_text
from ...plots.critical import contrastive_figure, token_html
from ...results import Result
from ...validation import Check, Interval, validate_params
from .rollouts import _finite_number

__all__ = ["contrastive_tokens", "ContrastiveResult", "train_negative_model"]


@dataclasses.dataclass(eq=False)
class ContrastiveResult(Result):
    """Contrastive estimation between a positive and a negative model on one text.

    Attributes:
        tokens: all T tokens of the text; token_ids ``[T]``.
        p_ce ``[T-1]``: softmax_v((1+β) z_pos − β z_neg)[y_t] for scored tokens 1..T-1;
        logprob_diff ``[T-1]``: log p_pos(y_t) − log p_neg(y_t); logp_pos / logp_neg ``[T-1]``.
        beta, text, pos_name, neg_name.

    ``to_dataframe()``: one row per scored token: ``position`` (1..T-1), ``token``, ``p_ce``, ``criticality``
    (1 − p_ce), ``logprob_diff``, ``logp_pos``, ``logp_neg``.
    """

    tokens: list
    token_ids: torch.Tensor
    p_ce: torch.Tensor
    logprob_diff: torch.Tensor
    logp_pos: torch.Tensor
    logp_neg: torch.Tensor
    beta: float
    text: str
    pos_name: str = ""
    neg_name: str = ""

    @property
    def criticality(self) -> torch.Tensor:
        """1 − p_ce: the criticality weight of each scored token ([T-1])."""
        return 1 - self.p_ce

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"position": range(1, len(self.tokens)), "token": self.tokens[1:],
                             "p_ce": self.p_ce.numpy(), "criticality": (1 - self.p_ce).numpy(),
                             "logprob_diff": self.logprob_diff.numpy(), "logp_pos": self.logp_pos.numpy(),
                             "logp_neg": self.logp_neg.numpy()})

    def figure(self, **kw):
        """Criticality 1 − p_ce and the log-prob difference per scored token
        (:func:`lensbench.plots.critical.contrastive_figure`)."""
        return contrastive_figure(self, **kw)

    def _repr_html_(self) -> str:
        return (f"<b>ContrastiveResult</b> (β = {self.beta:g}, {len(self.tokens) - 1} scored tokens; colour = "
                "1 − p_ce)<br>" + token_html(self.tokens[1:], (1 - self.p_ce).numpy()))


def _same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    try:
        return len(a) == len(b) and a.get_vocab() == b.get_vocab() and (
            getattr(a, "all_special_tokens", None) == getattr(b, "all_special_tokens", None))
    except Exception:  # noqa: BLE001
        return False


@torch.no_grad()
def _last_hidden(m: LensModel, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """Last block output ``[T-1, d]`` at positions 0..T-2 (those predicting tokens 1..T-1), through the model's
    backend."""
    with _adapter(m, adapter):
        L = m.n_layers
        return forward_batch(m, [ids], [L], logits=False).hidden[L][0, :-1]


class _adapter:
    """Activate a peft adapter by name for the call (restoring the previously active one)."""

    def __init__(self, m: LensModel, name: str | None):
        self.m, self.name, self.old = m, name, None

    def __enter__(self):
        if self.name is None:
            return self
        model = self.m.model
        if not hasattr(model, "set_adapter"):
            raise InputError(f"adapter {self.name!r} was given but {self.m.name} has no peft adapters "
                             "(load a peft model with lb.load(peft_model, tokenizer)).")
        self.old = getattr(model, "active_adapter", None)
        if callable(self.old):
            self.old = self.old()
        try:
            model.set_adapter(self.name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"adapter {self.name!r} could not be activated on {self.m.name}: {e}") from e
        return self

    def __exit__(self, *exc):
        if self.name is not None and self.old is not None:
            self.m.model.set_adapter(self.old)


_CONTRASTIVE_TOKENS_PARAMS = {
    "m_pos": [LensModel],
    "m_neg": [LensModel],
    "beta": [Check(_finite_number, "a finite number")],
    "pos_adapter": [None, str],
    "neg_adapter": [None, str],
    "add_bos": [None, bool],
    "chunk": [Interval(int, 1, None)],
    "progress": [bool],
}


@validate_params(_CONTRASTIVE_TOKENS_PARAMS)
def contrastive_tokens(m_pos: LensModel, m_neg: LensModel, text: str, *, beta: float = 1.0,
                       pos_adapter: str | None = None, neg_adapter: str | None = None, add_bos: bool | None = None,
                       chunk: int = 256, progress: bool = True) -> ContrastiveResult:
    """Contrastive estimation: teacher-force ``text`` through both models and score each token y_t (t >= 1) by
    p_ce(t) = softmax_v((1+β)·z_pos(t) − β·z_neg(t))[y_t] (criticality 1 − p_ce) and the log-likelihood
    difference log p_pos(y_t) − log p_neg(y_t).

    Two LoRA adapters on one peft base: pass the same LensModel twice with ``pos_adapter="pos",
    neg_adapter="neg"``. Tokenizers must match. Each model runs one forward over the whole text; the logits
    are then computed ``chunk`` positions at a time in float32 (a ``[chunk, V]`` block per model; ``progress``:
    a bar over those blocks when there is more than one).
    """
    check_text(text, "text")
    if not _same_tokenizer(m_pos.tokenizer, m_neg.tokenizer):
        raise InputError(f"m_pos ({m_pos.name}) and m_neg ({m_neg.name}) have different tokenizers; contrastive "
                         "estimation compares the two models token by token, so they must share one vocabulary "
                         "(use two fine-tunes or adapters of the same base model).")
    if m_pos.vocab_size != m_neg.vocab_size:
        raise InputError(f"m_pos has {m_pos.vocab_size} output logits but m_neg has {m_neg.vocab_size}; both must "
                         "score the same vocabulary.")
    ids = m_pos.encode(text, add_bos=add_bos)
    if len(ids) < 2:
        raise InputError("text must be at least 2 tokens long: the first token is not scored.")
    y = ids[1:]
    T1 = len(y)
    p_ce, lp_pos, lp_neg = torch.empty(T1), torch.empty(T1), torch.empty(T1)
    hp = _last_hidden(m_pos, ids, pos_adapter)
    hn = _last_hidden(m_neg, ids, neg_adapter)
    for s in tqdm(range(0, T1, chunk), desc="contrastive tokens", disable=not progress or T1 <= chunk, leave=False):
        check_cancelled()
        sl = slice(s, s + chunk)
        with torch.no_grad(), _adapter(m_pos, pos_adapter):
            zp = m_pos.unembed(hp[sl])
        with torch.no_grad(), _adapter(m_neg, neg_adapter):
            zn = m_neg.unembed(hn[sl]).to(zp.device)
        yy = y[sl].to(zp.device)[:, None]
        lp = torch.log_softmax(zp, -1)
        ln = torch.log_softmax(zn, -1)
        # log-softmax first: per-position constants cancel exactly in the contrast
        zc = (1 + beta) * lp - beta * ln
        p_ce[sl] = torch.softmax(zc, -1).gather(-1, yy)[:, 0].cpu()
        lp_pos[sl] = lp.gather(-1, yy)[:, 0].cpu()
        lp_neg[sl] = ln.gather(-1, yy)[:, 0].cpu()
    return ContrastiveResult(tokens=m_pos.to_str_tokens(ids), token_ids=ids.cpu(), p_ce=p_ce,
                             logprob_diff=lp_pos - lp_neg, logp_pos=lp_pos, logp_neg=lp_neg, beta=float(beta),
                             text=text, pos_name=m_pos.name + (f" [{pos_adapter}]" if pos_adapter else ""),
                             neg_name=m_neg.name + (f" [{neg_adapter}]" if neg_adapter else ""))


_TRAIN_NEGATIVE_PARAMS = {
    "pairs": [Check(lambda v: len(v) > 0 and all(len(p) == 2 and all(isinstance(x, str) and x for x in p)
                                                 for p in v), "a non-empty list of (prompt, answer) string pairs")],
    "n_steps": [Interval(int, 1, None)],
    "rank": [Interval(int, 1, None)],
    "lr": [Interval(float, 0, None, closed="neither")],
    "target_modules": [None, str, list, tuple],
    "seed": [int],
    "progress": [bool],
}


@validate_params(_TRAIN_NEGATIVE_PARAMS)
def train_negative_model(m: LensModel, pairs, *, n_steps: int = 60, rank: int = 8, lr: float = 2e-3,
                         target_modules: str | list[str] | tuple[str, ...] | None = "all-linear", seed: int = 0,
                         progress: bool = True) -> tuple[LensModel, list[float]]:
    """The negative model of contrastive estimation: a LoRA of ``m`` fine-tuned on wrong trajectories, merged.

    Args:
        pairs: ``[(prompt, wrong_answer), ...]``; the loss is the answer tokens' cross-entropy only (the prompt
            is context, not a target). One pair per step, cycling.
        n_steps: AdamW steps. rank: LoRA rank (``lora_alpha = 2·rank``, no dropout). lr: AdamW learning rate.
        target_modules: peft's ``target_modules``: ``"all-linear"`` (default: every linear layer but the output
            head, whatever the architecture), or module names, e.g. ``["q_proj", "k_proj", "v_proj", "o_proj"]``.
        seed: seeds the LoRA initialisation.

    Returns ``(m_neg, losses)``: a new :class:`LensModel` (the merged weights in ``m``'s dtype, ``m``'s tokenizer)
    and the per-step training loss. ``m`` is not modified; a float32 copy of its weights is trained, so peak
    memory is about twice the model's float32 size. The paper (cDPO, Lin et al. 2024) fine-tunes a full model on
    incorrect trajectories; a LoRA is the documented CPU-sized deviation.
    """
    from peft import LoraConfig, get_peft_model

    from ...model import load, model_errors
    batch = []
    for i, (p, a) in enumerate(pairs):
        p_ids = m.encode(p, add_bos=False, param=f"pairs[{i}] prompt")
        a_ids = m.encode(a, add_bos=False, param=f"pairs[{i}] answer")
        if len(p_ids) + len(a_ids) > m.max_length:
            raise InputError(f"pairs[{i}] is {len(p_ids) + len(a_ids)} tokens (prompt + answer) but {m.name} accepts "
                             f"at most {m.max_length}; shorten the prompt or the answer.")
        ids = torch.cat([p_ids, a_ids])[None].to(m.input_device)
        labels = ids.clone()
        labels[0, :len(p_ids)] = -100  # learn the answers, not the prompts
        batch.append((ids, labels))
    torch.manual_seed(seed)
    base = copy.deepcopy(m.model).float().train()
    tm = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    try:
        lora = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=tm))
    except ValueError as e:
        raise InputError(f"peft could not place LoRA layers with target_modules={target_modules!r} ({e}); pass "
                         "target_modules=[names of linear modules], e.g. the attention projections.") from e
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in tqdm(range(n_steps), desc="negative LoRA", disable=not progress, leave=False):
        check_cancelled()
        ids, labels = batch[step % len(batch)]
        try:
            with model_errors(m, f"training the negative LoRA on an input of shape {tuple(ids.shape)}"):
                loss = lora(input_ids=ids, labels=labels).loss
                loss.backward()
        except Exception as e:  # noqa: BLE001 - only OOM is translated
            if not is_oom(e):
                raise
            raise InputError(f"train_negative_model: out of memory on pair {step % len(batch)} "
                             f"({ids.shape[1]} tokens): use shorter pairs, a smaller rank, or a larger device "
                             "(a float32 copy of the model is trained).") from e
        v = loss.item()
        if not math.isfinite(v):
            raise FloatingPointError(f"train_negative_model: the loss is {v} at step {step}; lower lr (now {lr}).")
        opt.step()
        opt.zero_grad()
        losses.append(v)
    merged = lora.merge_and_unload().eval().to(m.dtype)
    return load(merged, m.tokenizer), losses
