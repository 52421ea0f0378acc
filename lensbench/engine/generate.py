"""Generation from a shared prefix: the in-process HF engine (batched ``generate`` reusing one prefix KV cache)
and per-row seeded sampling, so a row's continuation never depends on which rows share its batch."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import LensbenchError
from .batches import split_on_oom
from .prefix import PrefixCache


def _mix(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _filter_logits(z: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits with everything outside the top-p nucleus set to -inf (float32, [..., V])."""
    z = z.float() / max(temperature, 1e-6)
    if top_p < 1.0:
        srt, idx = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= top_p  # keep the smallest set reaching top_p (always >= 1 token)
        srt = srt.masked_fill(drop, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, srt)
    return z


def _gumbel(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-300, 1 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def seeded_choice(logits: torch.Tensor, seeds: Sequence[int], *, temperature: float = 1.0,
                  top_p: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` ([B, V]): argmax(filtered logits / T + Gumbel(seed_row)) — a sample from
    softmax(logits / T) restricted to the top-p nucleus; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.float().argmax(-1)
    z = _filter_logits(logits, temperature, top_p)
    noise = torch.stack([_gumbel(s, z.shape[-1]) for s in seeds]).to(z.device)
    return (z + noise).argmax(-1)


class _SeededSampling:
    """Logits processor for ``generate(do_sample=False)``: adds per-row seeded Gumbel noise so greedy decoding
    *samples*, each row from its own seed stream (independent of batch composition)."""

    def __init__(self, seeds: Sequence[int], start: int, temperature: float, top_p: float):
        self.seeds, self.start, self.temperature, self.top_p = list(seeds), start, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return scores
        step = input_ids.shape[1] - self.start
        z = _filter_logits(scores, self.temperature, self.top_p)
        noise = torch.stack([_gumbel(_mix(s, step), z.shape[-1]) for s in self.seeds]).to(z.device)
        return z + noise


@dataclasses.dataclass
class RolloutRequest:
    """What a sampler is asked for: one continuation per row of ``first`` appended to ``prefix_ids``.

    Attributes:
        m: the LensModel; prefix_ids: prompt + response prefix (list of ids); first: per row, ids forced right
            after the prefix (``[y_i]`` keep, ``[alt]`` replace, ``[]`` free); seeds: per-row seeds;
            settings: temperature, top_p, max_new_tokens, stop; state: the :class:`PrefixCache` to reuse.
    """

    m: Any
    prefix_ids: list
    first: list
    seeds: list
    settings: dict
    state: PrefixCache | None = None


def _eos_ids(m) -> tuple[Any, set]:
    eos = getattr(getattr(m.model, "generation_config", None), "eos_token_id", None) or m.tokenizer.eos_token_id
    return eos, set(eos if isinstance(eos, (list, tuple)) else [eos])


def _strip(m, rows: list[list[int]], eos_ids: set) -> list[list[int]]:
    """Cut each generated row at its first end-of-sequence token and drop trailing padding."""
    pad = m.pad_token_id
    res = []
    for row in rows:
        ids = []
        for t in row:
            if t in eos_ids:
                break
            ids.append(t)
        if pad not in eos_ids:
            while ids and ids[-1] == pad:
                ids.pop()
        res.append(ids)
    return res


@torch.no_grad()
def sample(req: RolloutRequest) -> list[list[int]]:
    """The in-process HF engine: ``generate`` for all rows at once, reusing the prefix KV cache expanded over the
    batch; each row samples from its own seed stream, so on out-of-memory the rows are split in halves and run
    again with identical results. Rows must force the same number of tokens (callers group them so).

    Returns the generated ids per row (without the forced tokens, cut at end-of-sequence)."""
    n_first = {len(f) for f in req.first}
    if len(n_first) != 1:
        raise LensbenchError("sample: all rows of one call must force the same number of tokens")
    order = list(range(len(req.first)))

    def run(idx: list[int]) -> list[list[int]]:
        return _generate(dataclasses.replace(req, first=[req.first[i] for i in idx],
                                             seeds=[req.seeds[i] for i in idx]), n_first == {0})

    return split_on_oom(req.m, order, run)


def _generate(req: RolloutRequest, drop_last: bool) -> list[list[int]]:
    from transformers import GenerationConfig, LogitsProcessorList

    from ..model import model_errors
    m, st = req.m, req.settings
    rows = torch.tensor([list(req.prefix_ids) + list(f) for f in req.first], device=m.input_device)
    state = req.state
    kw: dict[str, Any] = {}
    if state is not None and state.reuse:
        state.advance(req.prefix_ids)
        kw[m.capabilities["cache_kwarg"]] = state.expanded(len(rows), drop_last=drop_last)
    tok = m.tokenizer
    eos, eos_ids = _eos_ids(m)
    gc = GenerationConfig(do_sample=False, max_new_tokens=int(st["max_new_tokens"]), pad_token_id=m.pad_token_id,
                          eos_token_id=eos, stop_strings=list(st.get("stop") or []) or None)
    proc = _SeededSampling(req.seeds, rows.shape[1], float(st["temperature"]), float(st["top_p"]))
    with warnings.catch_warnings(), model_errors(m, f"generating {len(rows)} rows of {st['max_new_tokens']} tokens"):
        warnings.simplefilter("ignore")
        out = m.model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), generation_config=gc,
                               logits_processor=LogitsProcessorList([proc]),
                               tokenizer=tok if st.get("stop") else None, **kw)
    return _strip(m, out[:, rows.shape[1]:].tolist(), eos_ids)


hf_sampler = sample  # the name the critical-token probe records for the in-process engine


@torch.no_grad()
def greedy(m, ids: torch.Tensor, max_new_tokens: int, *, strip: bool = True) -> list[int]:
    """Greedy continuation of one prompt ``ids`` ``[T]`` (token ids), without the prompt. Generation ends at the
    model's end-of-sequence token, which ``strip=False`` keeps in the output."""
    from ..model import model_errors
    eos, eos_ids = _eos_ids(m)
    x = ids[None].to(m.input_device)
    with warnings.catch_warnings(), model_errors(m, f"generating {max_new_tokens} tokens greedily"):
        warnings.simplefilter("ignore")
        out = m.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=int(max_new_tokens),
                               do_sample=False, pad_token_id=m.pad_token_id if m.pad_token_id is not None else eos,
                               eos_token_id=eos)
    gen = out[0, x.shape[1]:].tolist()
    return _strip(m, [gen], eos_ids)[0] if strip else gen
