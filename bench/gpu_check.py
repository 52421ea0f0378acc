"""The GPU check: every public probe on random-weight models of realistic shape, in one script, under 8 minutes.

Run on a machine with a CUDA GPU from the root of a plain checkout (``make gpu-check``; lensbench need not be
installed: the checkout's folder is on ``sys.path`` under ``python -m``); it needs only torch, transformers,
tokenizers, accelerate, numpy, pandas, scipy, scikit-learn, tqdm, plus any wheels in ``.gpu-wheels/``
(``make gpu-wheels``), installed into a temporary folder when an import fails. It never downloads and never
loads the default model: models are built from Llama-3.2-1B / Llama-3.1-8B configs with random weights in
bfloat16 and a byte-level BPE trained here on ``lensbench/data/texts``.

Each section has its own time cap (SIGALRM between Python steps) inside a whole-script budget; it reports
correctness checks (each with its tolerance), peak ``torch.cuda.max_memory_allocated``, throughput and the
ratio of measured time to a compute floor where one is defined:

- lens: 2·(L+1)·T·V·d FLOPs of the unembedding readout at every layer, at the measured bf16 matmul FLOP/s;
- integrated gradients: ``n_steps`` × one forward+backward on the input embeddings (same dtype as IG runs);
- rollouts: generated tokens/s of ``critical_tokens`` vs a plain ``model.generate`` of the same batch.

Usage::

    python -m bench.gpu_check OUT_DIR            # the real check (prints "no CUDA device" and exits 0 without one)
    python -m bench.gpu_check OUT_DIR --dry-run  # same code on tiny shapes on CPU, < 1 minute

Writes ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md``; exits 1 naming every section whose correctness
check failed or which raised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import signal
import site
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench._harness import ROOT, command

T_START = time.time()
WHEELS = ROOT / ".gpu-wheels"
GPU_MISSING = ("plotly", "gguf", "nnsight", "transformer_lens")  # absent on the GPU machine (DESIGN.md §8)

#: Llama shapes (vocab 128256, GQA 8 KV heads); "tiny" is the dry run's
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
    "tiny-untied": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=192, vocab_size=1024, tie_word_embeddings=False),
}

#: per-section time caps in seconds (real mode); the whole script stops starting sections at BUDGET_S
CAPS = {"env": 20, "build": 30, "logit_lens": 30, "lens_sweep": 20, "tuned_lens": 30, "geometry": 30,
        "contextual_memory": 25, "attribution": 50, "filler": 40, "critical": 40, "contrastive": 15,
        "offload": 40, "8b": 60, "vllm": 60}
BUDGET_S = 470


class SectionTimeout(BaseException):  # noqa: N818 - BaseException so no probe's `except Exception` swallows it
    """Raised by SIGALRM when a section runs past its cap."""


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------- environment


class _Block(importlib.abc.MetaPathFinder):
    """Make ``import NAME`` fail for the given top-level names (simulates the GPU machine)."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is blocked (--block-imports)")
        return None


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ensure_imports() -> list[str]:
    """Import lensbench from this checkout; on ImportError install ``.gpu-wheels/*.whl`` into a temp folder
    (no index, no deps), add it as a site directory and retry. Returns notes."""
    notes = []
    try:
        importlib.import_module("lensbench")
        return notes
    except ImportError as e:
        notes.append(f"import lensbench failed ({e}); installing {WHEELS}")
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"import lensbench failed and {WHEELS} holds no wheels (run `make gpu-wheels` first)")
    target = Path(tempfile.mkdtemp(prefix="lensbench-gpu-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(target), *map(str, wheels)], check=True)
    site.addsitedir(str(target))
    importlib.invalidate_caches()
    importlib.import_module("lensbench")
    return notes


# ---------------------------------------------------------------- context and timing


class Ctx:
    """What sections share: device, shapes, texts, models, the fault to inject, results."""

    def __init__(self, args):
        import torch
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.small, self.big = ("tiny", "tiny-untied") if self.dry else ("llama-3.2-1b", "llama-3.1-8b")
        self.fault = args.inject_fault
        self.models: dict = {}
        self.flops = None
        self.rows: list[dict] = []

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, *a, **kw):
        """(result, seconds) of ``fn(*a, **kw)`` with device syncs around it."""
        self.sync()
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.sync()
        return out, time.perf_counter() - t


class Section:
    """One row: checks, numbers, status. ``check(name, value, tol)`` passes when ``value <= tol``."""

    def __init__(self, ctx: Ctx, name: str):
        self.ctx, self.name = ctx, name
        self.checks: list[dict] = []
        self.metrics: dict = {}
        self.notes: list[str] = []

    def check(self, what: str, value: float, tol: float, *, rule: str = "<="):
        value = float(value)
        if self.ctx.fault == self.name and not self.checks:
            value = float("inf") if rule == "<=" else float("-inf")  # the injected fault: first check fails
        ok = (value <= tol) if rule == "<=" else (value >= tol)
        ok = ok and not math.isnan(value)
        self.checks.append(dict(check=what, value=value, tol=tol, rule=rule, ok=bool(ok)))
        return ok

    def metric(self, **kw):
        self.metrics.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()})


@contextlib.contextmanager
def alarm(seconds: float):
    def fire(*_):
        raise SectionTimeout()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(ctx: Ctx, name: str, fn) -> dict:
    import torch
    sec = Section(ctx, name)
    left = ctx.args.budget - (time.time() - T_START)
    cap = min(CAPS[name] * ctx.args.cap_scale, left)
    row = dict(section=name, cap_s=round(cap, 1))
    if ctx.args.only and name not in ctx.args.only:
        row.update(status="skipped", why="not selected")
        ctx.rows.append(row)
        return row
    if cap < 3:
        row.update(status="skipped", why=f"whole-script budget ({ctx.args.budget:.0f} s) spent")
        ctx.rows.append(row)
        return row
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    status, why = "ok", ""
    try:
        with alarm(cap):
            fn(ctx, sec)
    except SectionTimeout:
        status, why = "timeout", f"stopped at its {cap:.0f} s cap"
    except SkipSection as e:
        status, why = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - reported as this section's failure
        status, why = "error", f"{type(e).__name__}: {e}"
        sec.notes.append(traceback.format_exc(limit=8))
    if status == "ok" and not all(c["ok"] for c in sec.checks):
        status = "FAIL"
        why = "; ".join(f"{c['check']} = {c['value']:.3g} (tol {c['rule']} {c['tol']:g})"
                        for c in sec.checks if not c["ok"])
    row.update(status=status, why=why, seconds=round(time.perf_counter() - t0, 2), checks=sec.checks,
               metrics=sec.metrics, notes=sec.notes)
    if ctx.cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    ctx.rows.append(row)
    print(f"[{time.time() - T_START:6.1f}s] {name:<18} {status:<8} {row['seconds']:7.2f}s {why[:100]}", flush=True)
    return row


class SkipSection(Exception):
    pass


# ---------------------------------------------------------------- models and tokenizer


def texts_dir() -> Path:
    return ROOT / "lensbench" / "data" / "texts"


@functools.lru_cache(maxsize=2)
def make_tokenizer(vocab_size: int, train_vocab: int):
    """Byte-level BPE trained on the in-repo texts (``train_vocab`` entries), padded with never-produced
    entries to ``vocab_size`` so every model id decodes. ``<pad>``, ``<s>``, ``</s>`` are ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=train_vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.read_text() for p in sorted(texts_dir().glob("*.txt"))], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    i = 0
    while len(vocab) < vocab_size:
        key = f"<unused{i}>"
        i += 1
        if key not in vocab:
            vocab[key] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(shape: str, device, dtype, seed: int = 0):
    """A random LlamaForCausalLM of ``shape`` built on ``device`` in ``dtype``: weights N(0, 1/fan_in), norms 1,
    the unembedding N(0, 16/d) so readouts are peaked as in trained models (logit std ~4)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    kw = SHAPES[shape]
    cfg = LlamaConfig(**kw, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    d = kw["hidden_size"]
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 4 / math.sqrt(d) if kw["tie_word_embeddings"] else 1.0, generator=gen)
            elif name.startswith("lm_head"):
                p.normal_(0, 4 / math.sqrt(d), generator=gen)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=gen)
    return model.eval()


def texts(ctx: Ctx, n: int, chars: int) -> list[str]:
    out = [p.read_text() for p in sorted(texts_dir().glob("*.txt"))]
    return [t[:chars] for t in out[:n]]


def n_tokens(ctx: Ctx, text: str) -> int:
    return len(ctx.models["tok"](text)["input_ids"])


# ---------------------------------------------------------------- sections


def sec_env(ctx: Ctx, sec: Section):
    import torch
    import transformers
    n = 256 if ctx.dry else 8192
    dt = torch.float32 if ctx.dry else torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dt)
    b = torch.randn(n, n, device=ctx.device, dtype=dt)
    for _ in range(3):
        a @ b
    reps = 10
    _, t = ctx.timed(lambda: [a @ b for _ in range(reps)])
    ctx.flops = 2 * n**3 * reps / t
    sec.metric(matmul_tflops=ctx.flops / 1e12, matmul=f"{n}^3 {str(dt)[6:]}", torch=torch.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               gpu=torch.cuda.get_device_name() if ctx.cuda else "cpu (dry run)",
               missing=[m for m in GPU_MISSING if not importable(m)])
    sec.check("matmul FLOP/s > 0", ctx.flops, 0.0, rule=">=")


def sec_build(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    kw = SHAPES[ctx.small]
    tok, t_tok = ctx.timed(make_tokenizer, kw["vocab_size"], 512 if ctx.dry else 8192)
    hf, t_build = ctx.timed(build_model, ctx.small, ctx.device, ctx.dtype)
    m, t_load = ctx.timed(lb.load, hf, tokenizer=tok)
    ref = copy.deepcopy(hf).float()  # the same (bf16-rounded) weights in float32
    m32 = lb.load(ref, tokenizer=tok)
    ctx.models.update(tok=tok, m=m, m32=m32)
    checks = m.anatomy.checks
    sec.metric(shape=ctx.small, params_m=sum(p.numel() for p in hf.parameters()) / 1e6, tokenizer_s=t_tok,
               build_s=t_build, load_validate_s=t_load, tokenizer_len=len(tok), n_layers=m.n_layers,
               d_model=m.d_model, vocab=m.vocab_size, dtype=str(m.dtype), m_device=str(m.device))
    sec.check("bf16 load: unembed(last block) == logits (log-prob abs)",
              checks["unembed(last block) == model logits"], lb.devices.tolerance(torch.bfloat16))
    sec.check("fp32 load: unembed(last block) == logits (log-prob abs)",
              m32.anatomy.checks["unembed(last block) == model logits"], lb.devices.tolerance(torch.float32))


def _need(ctx: Ctx, *keys):
    missing = [k for k in keys if k not in ctx.models]
    if missing:
        raise SkipSection(f"needs {missing} (an earlier section did not build them)")


def _model_logprobs(m, text: str):
    """[T, V] float32 log-probs of the model's own forward (the independent reference)."""
    import torch
    ids = m.encode(text)[None].to(m.input_device)
    with torch.no_grad():
        return torch.log_softmax(m.model(input_ids=ids).logits[0].float(), -1).cpu()


def sec_logit_lens(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    _need(ctx, "m", "m32")
    m, m32 = ctx.models["m"], ctx.models["m32"]
    txt = texts(ctx, 1, 200 if ctx.dry else 4000)[0]
    lb.logit_lens(m, txt[:100], progress=False)  # warm-up
    res, t = ctx.timed(lb.logit_lens, m, txt, top_k=5, progress=False)
    res32 = lb.logit_lens(m32, txt, top_k=5, progress=False)
    T, L = len(res.tokens), len(res.layers)
    lp = _model_logprobs(m, txt)
    lens_lp = res.top_probs[-1].float().clamp_min(1e-30).log()  # [T, k]
    mine = lp.gather(-1, res.top_ids[-1].long())
    sec.check("bf16: lens last layer == model logits (top-k log-probs abs)", (lens_lp - mine).abs().max(),
              lb.devices.tolerance(torch.bfloat16))
    lp32 = _model_logprobs(m32, txt)
    mine32 = lp32.gather(-1, res32.top_ids[-1].long())
    sec.check("fp32: lens last layer == model logits (top-k log-probs abs)",
              (res32.top_probs[-1].float().clamp_min(1e-30).log() - mine32).abs().max(),
              lb.devices.tolerance(torch.float32))
    sec.check("fp32: lens last-layer top-1 == argmax logits (mismatch rate)",
              (res32.top_ids[-1, :, 0] != lp32.argmax(-1)).float().mean(), 0.0)
    d_ent = (res.entropy.float() - res32.entropy.float()).abs()
    # tolerances from a 16-layer d=512 random model on CPU: mean 0.028 nats, agreement 0.96
    sec.check("bf16 vs fp32: entropy mean |diff| (nats)", d_ent.mean(), 0.1)
    sec.check("bf16 vs fp32: last-layer top-1 agreement", (res.top_ids[-1, :, 0] == res32.top_ids[-1, :, 0])
              .float().mean(), 0.8, rule=">=")
    flop = 2 * L * T * m.vocab_size * m.d_model
    sec.metric(tokens=T, layers=L, seconds=t, tok_per_s=T / t, floor_s=flop / ctx.flops,
               floor_ratio=t / (flop / ctx.flops), entropy_max_diff=float(d_ent.max()),
               floor="2(L+1)TVd readout FLOPs at measured matmul FLOP/s (the forward pass not counted)")


def sec_lens_sweep(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    tx = texts(ctx, 4 if ctx.dry else 8, 300 if ctx.dry else 4000)
    res, t = ctx.timed(lb.lens_sweep, m, tx, max_tokens_per_text=64 if ctx.dry else 512, progress=False)
    n_tok = sum(min(n_tokens(ctx, x), 64 if ctx.dry else 512) for x in tx)
    L = m.n_layers + 1
    flop = 2 * L * n_tok * m.vocab_size * m.d_model
    finite = all(torch.isfinite(torch.as_tensor(v)).all() for v in vars(res).values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())
    sec.check("all float fields finite", 0.0 if finite else 1.0, 0.0)
    sec.metric(texts=len(tx), tokens=n_tok, seconds=t, tok_per_s=n_tok / t, floor_ratio=t / (flop / ctx.flops))


def sec_tuned_lens(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    tx = texts(ctx, 4, 400 if ctx.dry else 6000)
    steps = 6 if ctx.dry else 30
    tl, t = ctx.timed(lb.train_tuned_lens, m, tx, n_steps=steps, max_tokens=256 if ctx.dry else 4096,
                      progress=False)
    res = lb.logit_lens(m, tx[0][:300], lens=tl, progress=False)
    sec.check("tuned-lens readout finite (non-finite count)", (~torch.isfinite(res.top_probs)).sum(), 0)
    sec.metric(steps=steps, seconds=t, s_per_step=t / steps)


def sec_geometry(ctx: Ctx, sec: Section):
    import numpy as np
    import torch

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    tx = texts(ctx, 4, 600 if ctx.dry else 4000)
    gid, t_id = ctx.timed(lb.intrinsic_dimension, m, tx, progress=False)
    lin, t_lin = ctx.timed(lb.linearity, m, tx, progress=False)
    sh, t_sh = ctx.timed(lb.shuffle_baseline, m, tx[0], levels=(0, 2, 4), progress=False)
    sec.check("intrinsic_dimension: non-finite estimates", (~np.isfinite(np.asarray(gid.values, float))).sum(), 0)
    sec.check("linearity: non-finite scores", (~np.isfinite(np.asarray(lin.score, float))).sum(), 0)
    # a known answer on the device: points on a random 6-dim linear subspace of R^d
    g = torch.Generator(device=ctx.device).manual_seed(0)
    basis = torch.linalg.qr(torch.randn(m.d_model, 6, device=ctx.device, generator=g))[0]
    X = torch.randn(4000, 6, device=ctx.device, generator=g) @ basis.T
    est = float(lb.estimators.twonn(X))
    sec.check("twonn on a 6-dim subspace (device tensor): |ID - 6| / 6", abs(est - 6) / 6, 0.2)
    sec.metric(intrinsic_dimension_s=t_id, linearity_s=t_lin, shuffle_baseline_s=t_sh,
               shuffle_rows=len(sh.to_dataframe()))


def sec_contextual_memory(ctx: Ctx, sec: Section):
    import numpy as np

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    tx = texts(ctx, 2 if ctx.dry else 4, 300 if ctx.dry else 3000)
    res, t = ctx.timed(lb.contextual_memory, m, tx, n_steps=20 if ctx.dry else 100, n_boot=50,
                       folds=2, progress=False)
    v = np.asarray(res.to_dataframe().select_dtypes("number").to_numpy(), dtype=float)
    sec.check("non-finite values in the table", (~np.isfinite(v)).sum(), 0)
    sec.metric(seconds=t)


def _fwd_bwd_seconds(ctx: Ctx, m, text: str) -> float:
    """One forward+backward w.r.t. the input embeddings of ``m`` on ``text`` (last position's max log-prob)."""
    ids = m.encode(text)[None].to(m.input_device)

    def once():
        e = m.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m.model(inputs_embeds=e).logits[0, -1].float().log_softmax(-1).max()
        out.backward()
        return e.grad
    once()
    return min(ctx.timed(once)[1] for _ in range(3))


def sec_attribution(ctx: Ctx, sec: Section):
    import lensbench as lb
    _need(ctx, "m", "m32")
    m, m32 = ctx.models["m"], ctx.models["m32"]
    txt = texts(ctx, 1, 120 if ctx.dry else 400)[0]
    n_steps = 16 if ctx.dry else 50
    ig, t_ig = ctx.timed(lb.attribute, m, txt, method="integrated_gradients", n_steps=n_steps, progress=False)
    upcast = bool(ig.settings.get("upcast", True))
    gap = ig.relative_gap
    if gap is not None:
        sec.check("IG completeness |gap| / |F(x)-F(x')|", gap.abs().max(), lb.probes.attribution.GAP_TOLERANCE)
    occ, t_occ = ctx.timed(lb.attribute, m, txt, method="occlusion", progress=False)
    gxi, t_gxi = ctx.timed(lb.attribute, m, txt, method="grad_x_input", progress=False)
    faith, t_f = ctx.timed(lb.faithfulness, m, ig, n_samples=2 if ctx.dry else 8)
    t_fb = _fwd_bwd_seconds(ctx, m32 if upcast else m, txt)
    sec.check("IG scores finite (non-finite count)", (~ig.scores.isfinite()).sum(), 0)
    sec.check("occlusion scores finite (non-finite count)", (~occ.scores.isfinite()).sum(), 0)
    sec.metric(tokens=len(ig.source_tokens), n_steps=n_steps, upcast=upcast, ig_s=t_ig, occlusion_s=t_occ,
               grad_x_input_s=t_gxi, faithfulness_s=t_f, fwd_bwd_s=t_fb, floor_ratio=t_ig / (n_steps * t_fb),
               gap=None if gap is None else float(gap.abs().max()),
               faithfulness={k: v for k, v in faith.items() if isinstance(v, (int, float))},
               floor="IG seconds / (n_steps x one forward+backward in the dtype IG runs)")


def sec_filler(ctx: Ctx, sec: Section):
    import numpy as np

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    tx = texts(ctx, 2, 300 if ctx.dry else 1500)
    ab, t_ab = ctx.timed(lb.filler_ablation, m, tx, continuation_words=6 if ctx.dry else 16, n_control=1,
                         n_boot=50, progress=False)
    items = lb.tasks.three_sum(4 if ctx.dry else 16, length=4, dim=2, seed=0)
    counts = (0, 4) if ctx.dry else (0, 8, 32, 128)
    sw, t_sw = ctx.timed(lb.filler_sweep, m, items, counts=counts, n_boot=50, progress=False)
    for name, r in (("filler_ablation", ab), ("filler_sweep", sw)):
        v = np.asarray(r.to_dataframe().select_dtypes("number").to_numpy(), dtype=float)
        sec.check(f"{name}: all-NaN table", float(v.size == 0 or np.isnan(v).all()), 0.0)
    sec.metric(filler_ablation_s=t_ab, filler_sweep_s=t_sw, sweep_items=len(items), counts=list(counts))


def sec_critical(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    _need(ctx, "m")
    m = ctx.models["m"]
    prompt = "Question: what is 12 + 30? Answer step by step."
    response = " 12 plus 30 is 42, so the answer is 42."
    n, new = (4, 8) if ctx.dry else (32, 48)
    positions = [0, 4] if ctx.dry else [0, 4, 8]
    res, t = ctx.timed(lb.critical_tokens, m, prompt, response, checker=lb.checkers.number(42), n_samples=n,
                       max_new_tokens=new, positions=positions, pass_k=(1,), progress=False)
    rollouts = int(res.n_rollouts)
    sec.check("rollouts generated (expected > 0)", rollouts, 1, rule=">=")
    ids = m.encode(prompt + response)[None].to(m.input_device).repeat(n, 1)
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, pad_token_id=0)
    with torch.no_grad():
        m.model.generate(ids[:2], max_new_tokens=2, do_sample=True, pad_token_id=0)
        _, t_gen = ctx.timed(m.model.generate, ids, **gen_kw)
    plain = n * new / t_gen
    ours = rollouts * new / t  # an upper bound on tokens: rows may stop early at EOS or a stop string
    sec.metric(rollouts=rollouts, seconds=t, tok_per_s=ours, generate_tok_per_s=plain, ratio_to_generate=ours / plain,
               note="critical tok/s counts max_new_tokens per rollout; generate: same batch, min_new_tokens=max")


def sec_contrastive(ctx: Ctx, sec: Section):
    import lensbench as lb
    _need(ctx, "m", "m32")
    m, m32 = ctx.models["m"], ctx.models["m32"]
    txt = texts(ctx, 1, 200 if ctx.dry else 2000)[0]
    same, t = ctx.timed(lb.contrastive_tokens, m, m, txt)
    sec.check("same model twice: |logprob_diff| max", same.logprob_diff.abs().max(), 1e-6)
    mixed = lb.contrastive_tokens(m, m32, txt)
    sec.check("bf16 vs fp32 weights: |logprob_diff| mean (nats)", mixed.logprob_diff.abs().mean(), 0.25)
    sec.metric(tokens=len(same.logprob_diff) + 1, seconds=t, bf16_fp32_max=float(mixed.logprob_diff.abs().max()))


def sec_offload(ctx: Ctx, sec: Section):
    """The small model's blocks split between the GPU and the CPU (dry run: CPU and disk) by accelerate, vs the
    unsplit model: lens and IG numbers must agree within bf16 tolerance."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    import lensbench as lb
    _need(ctx, "m", "tok")
    m = ctx.models["m"]
    L = m.n_layers
    main, off = ("cpu", "disk") if ctx.dry else (0, "cpu")
    hf = copy.deepcopy(m.model).to("cpu")
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    # accelerate's own placement under max_memory: 75% of the model's bytes allowed on the main device
    dmap = infer_auto_device_map(hf, max_memory={main: int(size * 0.75), off: 100 * 2**30},
                                 no_split_module_classes=["LlamaDecoderLayer"])
    placed = sorted({str(v) for v in dmap.values()})
    if len(placed) < 2:
        raise CheckFailed(f"max_memory did not split the model: {dmap}")
    with tempfile.TemporaryDirectory() as folder:
        hf = dispatch_model(hf, dmap, main_device="cpu" if ctx.dry else 0, offload_dir=folder)
        ms = lb.load(hf, tokenizer=ctx.models["tok"])
        txt = texts(ctx, 1, 120 if ctx.dry else 1000)[0]
        a, t_split = ctx.timed(lb.logit_lens, ms, txt, top_k=5, progress=False)
        b, t_ref = ctx.timed(lb.logit_lens, m, txt, top_k=5, progress=False)
        sec.check("split vs unsplit: entropy max |diff| (nats)", (a.entropy - b.entropy).abs().max(),
                  lb.devices.tolerance(torch.bfloat16))
        # upcast=False on both: an offloaded model is not upcast, so compare like with like
        ga = lb.attribute(ms, txt[:80], method="grad_x_input", upcast=False, progress=False)
        gb = lb.attribute(m, txt[:80], method="grad_x_input", upcast=False, progress=False)
        rel = (ga.scores - gb.scores).abs().max() / gb.scores.abs().max().clamp_min(1e-12)
        sec.check("split vs unsplit: grad x input max rel diff", rel, 0.05)
        def where(name):
            keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
            return str(dmap[max(keys, key=len)])
        n_off = sum(where(f"model.layers.{i}") == str(off) for i in range(L))
        sec.metric(map=f"{n_off}/{L} blocks on {off} (max_memory {main}: 75% of the model)", placed=placed,
                   lens_split_s=t_split, lens_unsplit_s=t_ref, slowdown=t_split / t_ref, m_device=str(ms.device))
        del ms, hf


def sec_8b(ctx: Ctx, sec: Section):
    import torch

    import lensbench as lb
    _need(ctx, "tok")
    for k in ("m32",):  # room for the big model's float32 IG copy
        ctx.models.pop(k, None)
    if ctx.cuda:
        torch.cuda.empty_cache()
    tok = make_tokenizer(SHAPES[ctx.big]["vocab_size"], 512 if ctx.dry else 8192)
    hf, t_build = ctx.timed(build_model, ctx.big, ctx.device, ctx.dtype, 1)
    m, t_load = ctx.timed(lb.load, hf, tokenizer=tok)
    sec.check("load: unembed(last block) == logits (log-prob abs)",
              m.anatomy.checks["unembed(last block) == model logits"], lb.devices.tolerance(torch.bfloat16))
    txt = texts(ctx, 1, 200 if ctx.dry else 4000)[0]
    lb.logit_lens(m, txt[:100], progress=False)
    res, t = ctx.timed(lb.logit_lens, m, txt, top_k=5, progress=False)
    lp = _model_logprobs(m, txt)
    mine = lp.gather(-1, res.top_ids[-1].long())
    sec.check("lens last layer == model logits (top-k log-probs abs)",
              (res.top_probs[-1].float().clamp_min(1e-30).log() - mine).abs().max(),
              lb.devices.tolerance(torch.bfloat16))
    T, L = len(res.tokens), len(res.layers)
    flop = 2 * L * T * m.vocab_size * m.d_model
    peak_lens = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None
    n_steps = 16 if ctx.dry else 32
    ig, t_ig = ctx.timed(lb.attribute, m, txt[:60 if ctx.dry else 200], method="integrated_gradients", n_steps=n_steps,
                         progress=False)
    gap = ig.relative_gap
    sec.metric(shape=ctx.big, params_m=sum(p.numel() for p in hf.parameters()) / 1e6, build_s=t_build,
               load_validate_s=t_load, lens_tokens=T, lens_s=t, lens_tok_per_s=T / t,
               lens_floor_ratio=t / (flop / ctx.flops), peak_gib_after_lens=peak_lens, ig_tokens=len(ig.source_tokens),
               ig_n_steps=n_steps, ig_s=t_ig, ig_upcast=bool(ig.settings.get("upcast", True)),
               ig_gap=None if gap is None else float(gap.abs().max()))
    del m, hf, res, ig
    if ctx.cuda:
        torch.cuda.empty_cache()


def sec_vllm(ctx: Ctx, sec: Section):
    import lensbench as lb
    if not importable("vllm"):
        raise SkipSection("vllm is not importable here")
    try:
        from lensbench.engines import VLLM, vllm_server  # noqa: F401
    except ImportError as e:
        raise SkipSection(f"lensbench.engines.VLLM missing ({e})") from None
    if not ctx.cuda:
        raise SkipSection("dry run: vLLM runs only in the GPU check")
    from lensbench.engine import RolloutRequest
    _need(ctx, "m", "tok")
    m = ctx.models["m"]
    with tempfile.TemporaryDirectory() as d:
        m.model.save_pretrained(d)
        ctx.models["tok"].save_pretrained(d)
        with vllm_server(d, python=sys.executable, enforce_eager=True, startup_timeout=CAPS["vllm"]) as eng:
            prefix = m.encode("Question: what is 12 + 30? Answer: 12 plus 30 is").tolist()
            n, new = 64, 64
            req = RolloutRequest(m=m, prefix_ids=prefix, first=[[]] * n, seeds=list(range(n)),
                                 settings=dict(temperature=1.0, top_p=1.0, max_new_tokens=new, stop=None))
            rows, t = ctx.timed(eng.sample, req)
            got = sum(len(r) for r in rows)
            sec.check("vLLM generated tokens (expected > 0)", got, 1, rule=">=")
            sec.metric(startup_s=getattr(eng, "startup_seconds", None), rows=n, tokens=got, seconds=t,
                       tok_per_s=got / t)
    del lb


SECTIONS = [("env", sec_env), ("build", sec_build), ("logit_lens", sec_logit_lens), ("lens_sweep", sec_lens_sweep),
            ("tuned_lens", sec_tuned_lens), ("geometry", sec_geometry), ("contextual_memory", sec_contextual_memory),
            ("attribution", sec_attribution), ("filler", sec_filler), ("critical", sec_critical),
            ("contrastive", sec_contrastive), ("offload", sec_offload), ("8b", sec_8b), ("vllm", sec_vllm)]


# ---------------------------------------------------------------- report


def _headline(row: dict) -> str:
    mt = row.get("metrics", {})
    for k in ("matmul_tflops", "tok_per_s", "lens_tok_per_s", "params_m", "ig_s", "seconds"):
        if mt.get(k) is not None and isinstance(mt[k], (int, float)):
            return f"{k}={mt[k]:.4g}"
    return ""


def _ratio(row: dict) -> str:
    mt = row.get("metrics", {})
    for k in ("floor_ratio", "lens_floor_ratio", "ratio_to_generate", "slowdown"):
        if isinstance(mt.get(k), (int, float)):
            return f"{k}={mt[k]:.3g}"
    return ""


def table(rows: list[dict]) -> str:
    head = "| section | status | s | peak GiB | throughput | vs floor | checks |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        checks = r.get("checks", [])
        ck = f"{sum(c['ok'] for c in checks)}/{len(checks)}" if checks else "-"
        lines.append(f"| {r['section']} | {r['status']} | {r.get('seconds', '-')} | {r.get('peak_gib', '-')} | "
                     f"{_headline(r)} | {_ratio(r)} | {ck} |")
    return head + "\n".join(lines) + "\n"


def write(ctx: Ctx, out: Path, failed: list[str]):
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(mode="dry-run" if ctx.dry else "gpu", total_s=round(time.time() - T_START, 1),
                budget_s=ctx.args.budget, failed=failed, fault=ctx.fault, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                command=ctx.args.command)
    (out / "gpu_check.json").write_text(json.dumps(dict(meta=meta, sections=ctx.rows), indent=1, default=str))
    md = [f"# GPU check ({meta['mode']}, {meta['date']}, {meta['total_s']} s)\n",
          f"Reproduce (from the repository root): `{meta['command']}`\n", table(ctx.rows)]
    for r in ctx.rows:
        md.append(f"\n## {r['section']}: {r['status']}" + (f" ({r['why']})" if r.get("why") else "") + "\n")
        for c in r.get("checks", []):
            md.append(f"- {'ok' if c['ok'] else 'FAIL'}: {c['check']} = {c['value']:.4g} (tol {c['rule']} {c['tol']:g})")
        if r.get("metrics"):
            md.append("- metrics: " + json.dumps(r["metrics"], default=str))
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (same code path), < 1 minute")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="whole-script seconds (no section starts later)")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiply every section's time cap")
    p.add_argument("--only", nargs="*", default=None, help="run only these sections (others marked skipped)")
    p.add_argument("--inject-fault", default=None, help="make this section's first correctness check fail")
    p.add_argument("--block-imports", default="", help="comma-separated top-level modules made unimportable")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    out_dir = args.out.resolve()
    shown = str(out_dir.relative_to(ROOT)) if out_dir.is_relative_to(ROOT) else "OUT_DIR"
    args.command = command("bench.gpu_check", [shown if a == str(args.out) else a for a in argv])
    if args.block_imports:
        sys.meta_path.insert(0, _Block(args.block_imports.split(",")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs one (use --dry-run to exercise it on CPU)")
        return 0
    notes = ensure_imports()
    for n in notes:
        print(n)
    import warnings
    warnings.filterwarnings("ignore")
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    ctx = Ctx(args)
    for name, fn in SECTIONS:
        run_section(ctx, name, fn)
    failed = [r["section"] for r in ctx.rows if r["status"] in ("FAIL", "error")]
    write(ctx, args.out, failed)
    print()
    print(table(ctx.rows))
    print(f"total {time.time() - T_START:.1f} s; results in {args.out}/gpu_check.md and gpu_check.json")
    if failed:
        for r in ctx.rows:
            if r["section"] in failed:
                print(f"FAILED section {r['section']}: {r['why']}", file=sys.stderr)
        print(f"GPU check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
