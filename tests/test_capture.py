"""The capture engine: batching, padding, backends, OOM back-off, bad input."""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import ARCHS

import lensbench as lb
from lensbench.testing import tiny_model

TEXTS = ["hello world the fox", "The capital of France is Paris, one two three four five six", "Le chat"]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_right_equal_unbatched(tiny, arch):
    m = tiny(arch)
    ref = m.capture(TEXTS, batch_size=1, progress=False)
    right = m.capture(TEXTS, batch_size=3, progress=False)
    left = m.capture(TEXTS, batch_size=3, padding_side="left", progress=False)
    for i in range(len(TEXTS)):
        h = ref.hidden_states(i)
        assert h.shape == (m.n_layers + 1, len(ref.input_ids(i)), m.d_model)
        assert torch.allclose(right.hidden_states(i), h, atol=1e-4, rtol=1e-4)
        assert torch.allclose(left.hidden_states(i), h, atol=1e-4, rtol=1e-4), arch


def test_capture_matches_hf_hidden_states(tiny):
    m = tiny("gpt2")
    cap = m.capture(TEXTS[1], progress=False)
    with torch.no_grad():
        hs = m.forward(cap.input_ids(0)[None], output_hidden_states=True).hidden_states
    for la in range(m.n_layers):  # HF's last state is post-final-norm; ours is pre-norm by convention
        assert torch.equal(cap.hidden_states(0)[la], hs[la][0])
    assert torch.allclose(m.apply_final(cap.hidden_states(0)[m.n_layers]), hs[-1][0], atol=1e-6)


def test_layer_subset_and_negative_indices(tiny):
    m = tiny("llama")
    full = m.capture(TEXTS[0], progress=False)
    sub = m.capture(TEXTS[0], layers=[0, -1], progress=False)
    assert sub.layers == [0, m.n_layers]
    assert torch.equal(sub.hidden_states(0)[1], full.hidden_states(0)[-1])


def test_reduce_runs_on_device_per_text(tiny):
    m = tiny("llama")
    seen = []

    def reduce(batch):
        seen.append(len(batch.indices))
        return [batch.hidden_of(b, [m.n_layers]).norm(dim=-1).mean().item() for b in range(len(batch.indices))]
    cap = m.capture(TEXTS, reduce=reduce, batch_size=2, progress=False)
    full = m.capture(TEXTS, progress=False)
    assert seen == [2, 1]
    for i in range(3):
        assert cap.results[i] == pytest.approx(full.hidden_states(i)[-1].norm(dim=-1).mean().item(), rel=1e-5)
    with pytest.raises(lb.InputError, match="hidden states"):
        cap.hidden_states(0)


def test_oom_backoff_gives_identical_results(tiny):
    """Simulated out-of-memory on any batch larger than one: the engine halves and finishes, same numbers."""
    m = tiny("llama")
    ref = m.capture(TEXTS, batch_size=1, progress=False)

    def boom(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    h = m.model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        cap = m.capture(TEXTS, batch_size=3, progress=False)
    finally:
        h.remove()
    assert cap.stats["oom_retries"] == 1 and cap.stats["batch_size"] == 1  # 3 -> 1
    for i in range(3):
        assert torch.equal(cap.hidden_states(i), ref.hidden_states(i))


def test_oom_at_batch_one_is_explained(tiny):
    m = tiny("llama")

    def boom(*_a, **_k):
        raise RuntimeError("CUDA out of memory (simulated)")
    h = m.model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(lb.InputError, match="out of memory with batch_size=1"):
            m.capture(TEXTS[0], progress=False)
    finally:
        h.remove()


def test_bos_switch(default_model, tiny):
    m = tiny("llama")
    bos = m.tokenizer.bos_token_id
    assert m.capture("hi there", add_bos=True, progress=False).input_ids(0)[0] == bos
    assert m.capture("hi there", add_bos=False, progress=False).input_ids(0)[0] != bos
    d = default_model  # SmolLM2's tokenizer adds no BOS by default
    assert d.capture("hi", progress=False).input_ids(0)[0] != d.tokenizer.bos_token_id
    assert d.capture("hi", add_bos=True, progress=False).input_ids(0)[0] == d.tokenizer.bos_token_id


@pytest.mark.parametrize("bad, match", [
    ("", "empty"), ("   \n", "whitespace"), (None, "must be a string"), (42, "must be a string"),
    ([], "empty list"), (["ok", 3], r"texts\[1\] must be a string"), (["ok", ""], r"texts\[1\] is empty"),
])
def test_bad_text(tiny, bad, match):
    with pytest.raises(lb.InputError, match=match):
        tiny("llama").capture(bad, progress=False)


@pytest.mark.parametrize("layers", [3, -4, [0, 99], "all", [1.5], []])
def test_bad_layers(tiny, layers):
    with pytest.raises(lb.InputError, match="layer"):
        tiny("llama").capture("hello", layers=layers, progress=False)


def test_too_long_text_raises_or_truncates(tiny):
    m = tiny("gpt2")  # n_positions = 512
    long = "hello world " * 400
    with pytest.raises(lb.InputError, match="accepts at most 512.*truncate=True"):
        m.capture(long, progress=False)
    with pytest.warns(UserWarning, match="truncated"):
        cap = m.capture(long, truncate=True, progress=False)
    assert cap.hidden_states(0).shape[1] == 512
    # the first 512 tokens of the text, captured exactly as if they had been passed alone
    assert cap.input_ids(0).tolist() == m.tokenizer(long)["input_ids"][:512]
    assert torch.equal(cap.hidden_states(0), m.capture(cap.input_ids(0), progress=False).hidden_states(0))


def test_bad_batch_size_and_padding(tiny):
    m = tiny("llama")
    with pytest.raises(lb.InputError, match="batch_size"):
        m.capture("hi", batch_size=0, progress=False)
    with pytest.raises(lb.InputError, match="padding_side"):
        m.capture("hi", padding_side="middle", progress=False)


def _nnsight_and_bridge():
    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer
    model, tok = tiny_model("llama")
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    tok2 = AutoTokenizer.from_pretrained(d)  # the bridge needs a saved-and-reloaded tokenizer
    hf = lb.load(model, tok2)
    nn = lb.load(LanguageModel(model, tokenizer=tok2))
    br = lb.load(TransformerBridge.boot_transformers(d, hf_model=model, tokenizer=tok2), tok2)
    return hf, nn, br


@pytest.fixture(scope="module")
def three_backends():
    return _nnsight_and_bridge()


def test_three_backends_agree(three_backends):
    hf, nn, br = three_backends
    assert (hf.backend, nn.backend, br.backend) == ("hf", "nnsight", "transformer_lens")
    ref = hf.capture(TEXTS, batch_size=3, progress=False)
    for other in (nn, br):
        cap = other.capture(TEXTS, batch_size=3, progress=False)
        for i in range(len(TEXTS)):
            assert torch.allclose(cap.hidden_states(i), ref.hidden_states(i), atol=1e-5), other.backend
    # explicit backend override on the same model
    cap = nn.capture(TEXTS, backend="hf", progress=False)
    assert torch.allclose(cap.hidden_states(1), ref.hidden_states(1), atol=1e-5)
    with pytest.raises(lb.InputError, match="backend"):
        hf.capture("hi", backend="jax", progress=False)
