"""Tiny random causal LMs built from configs, with a byte-level BPE tokenizer trained in-process.

Used by the test suite's model matrix and handy for trying a probe on an architecture in milliseconds::

    from lensbench.testing import tiny_model
    m = lb.load(*tiny_model("gemma2"))
"""

from __future__ import annotations

import functools

import torch

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris. "
    "One, two, three, four, five; six seven eight nine ten! Language models predict the next token. "
    "Hello world, hello lens. Numbers: 12 + 30 = 42, 7 * 6 = 42. Le chat est noir. Der Hund ist braun. "
)

VOCAB = 384

# model_type -> extra config kwargs (dimensions are shared: d=64, 4 heads, 2 layers unless said)
#: the dense decoder most families share (d=64, 4 heads, 2 layers, MLP 128); ``_GQA``: with 2 key/value heads
_DENSE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=4096)
_GQA = dict(_DENSE, num_key_value_heads=2)
ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(_DENSE),
    "llama": dict(_GQA),
    "mistral": dict(_GQA),
    "mixtral": dict(_GQA, num_local_experts=4),
    "qwen2": dict(_GQA),
    "qwen3": dict(_GQA, head_dim=16),
    "gemma": dict(_DENSE, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(_GQA, head_dim=16, sliding_window=8),
    "gemma3_text": dict(_GQA, head_dim=16, sliding_window=8),
    "phi": dict(_DENSE),
    "phi3": dict(_DENSE, num_key_value_heads=4),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=4096, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512),
    "stablelm": dict(_DENSE, num_key_value_heads=4),
    "olmo": dict(_DENSE),
    "olmo2": dict(_DENSE),
    "cohere": dict(_DENSE, num_key_value_heads=4, logit_scale=0.5),
    "starcoder2": dict(_GQA),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, n_ctx=512),
    "granite": dict(_GQA, logits_scaling=2.0),
    "opt_project_out": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=4096, word_embed_proj_dim=32, do_layer_norm_before=False),
    # mixture-of-experts and heterogeneous stacks (a dense first layer, then MoE layers)
    "qwen2_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096),
    "olmoe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096),
    "deepseek_v3": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        max_position_embeddings=4096),
    "nemotron": dict(_GQA, head_dim=16),
    "glm4": dict(_GQA, head_dim=16),
    # state-space and recurrent models (layer l = the residual entering block l, as for transformers)
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "mamba2": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, num_heads=8,
                   head_dim=16, n_groups=1),
    "falcon_mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "rwkv": dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128,
                 context_length=512),
    # chunk_size above any test length: transformers' chunkwise xLSTM kernel fails in bfloat16 (its own bug)
    "xlstm": dict(hidden_size=64, embedding_dim=64, num_hidden_layers=2, num_blocks=2, num_heads=4,
                  chunk_size=1024),
    # hybrids: attention + SSM blocks of different classes in one stack; Zamba shares one attention block
    "jamba": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_expand=2),
    "zamba": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, attention_hidden_size=128, mamba_d_state=8, mamba_expand=2,
                  attn_layer_period=2, attn_layer_offset=1),
    "zamba2": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=128, mamba_d_state=8, mamba_expand=2, mamba_headdim=16, n_mamba_heads=8,
                   layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]),
    "falcon_h1": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16, mamba_expand=2,
                      mamba_n_groups=1, head_dim=16, mamba_d_ssm=None),
    "recurrent_gemma": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                            intermediate_size=128, lru_width=64, attention_window_size=16, head_dim=16,
                            block_types=["recurrent", "recurrent", "attention"]),
    # several residual streams: Gemma3n's AltUp (4 streams, merged as the model merges them)
    "gemma3n_text": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, head_dim=16, vocab_size_per_layer_input=VOCAB,
                         hidden_size_per_layer_input=8, laurel_rank=8, altup_num_inputs=4, num_kv_shared_layers=0,
                         activation_sparsity_pattern=[0.0] * 4, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"] * 2),
    # hyper-connections: [B, T, 4, d] streams merged by the model's own head module before the final norm
    "deepseek_v4": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, head_dim=16, max_position_embeddings=512),
}

#: families whose layer stack is not one homogeneous list of transformer blocks, or that are not transformers
SSM_AND_HYBRID = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "jamba", "zamba", "zamba2", "falcon_h1",
                  "recurrent_gemma", "gemma3n_text", "deepseek_v3", "deepseek_v4")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 384) trained in-process on a built-in string; BOS/EOS/PAD set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    kw = dict(ARCHITECTURES[arch], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return AutoConfig.for_model(arch.split("_project_out")[0], **kw)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """``(model, tokenizer)``: a random 2-layer ``arch`` model (d=64) and :func:`tiny_tokenizer`."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init of some archs (zero-init norms, tiny std) makes every layer look alike; spread weights out
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:
                p.uniform_(0.6, 1.4) if "weight" in name else p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.05)
    return model.to(dtype).eval(), tiny_tokenizer()


#: generic small sizes for :func:`shrunk_model` (set where a config has the attribute)
_SMALL = dict(hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2,
              num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, intermediate_size=128,
              ffn_dim=128, n_inner=128, head_dim=16, max_position_embeddings=512, n_positions=512, vocab_size=VOCAB)


def shrunk_model(model_type: str, *, max_params: float = 60e6):
    """A random model of any ``model_type`` from transformers' causal-LM auto-mapping: its default config with
    generic small sizes set after construction (the config may become inconsistent: then building or
    lensbench's validation fails, which is what the any-architecture sweep checks for clear errors).

    Returns the model, or raises ``ValueError`` naming why it could not be built offline."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        cfg = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001 - reported as "cannot be built"
        raise ValueError(f"{model_type}: no default config ({type(e).__name__})") from e
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for k, v in _SMALL.items():
            try:
                if hasattr(c, k):
                    setattr(c, k, v)
            except Exception:  # noqa: BLE001 - per-layer, frozen or validated attributes stay as they are
                pass
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - reported as "cannot be built"
        raise ValueError(f"{model_type}: cannot be built from a shrunk config ({type(e).__name__})") from e
    n = sum(p.numel() for p in model.parameters())
    if n > max_params:
        raise ValueError(f"{model_type}: {n / 1e6:.0f}M parameters after shrinking")
    return model.eval()


class OOMOnce:
    """A forward pre-hook on ``model`` that raises a real ``torch.OutOfMemoryError`` on its ``k``-th call (``k=0``:
    never; it then only counts calls). Use as a context manager or call :meth:`remove`.

    Attributes: calls (forward calls seen), fired (whether the error was raised)."""

    def __init__(self, model: torch.nn.Module, k: int = 1):
        self.k, self.calls, self.fired = k, 0, False
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1
        if not self.fired and self.calls == self.k:
            self.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class GatedForward:
    """Hold a model's first forward pass in one named thread until released, and count block calls after it.

    >>> with GatedForward(m, "lb-workbench") as gate:   # doctest: +SKIP
    ...     start_job(); gate.entered.wait(60); cancel(); gate.release.set()
    >>> gate.blocks                                     # doctest: +SKIP
    0

    ``entered`` is set when the thread's forward starts; the forward waits on ``release`` (at most 60 s);
    ``blocks`` counts calls of the first block. Both hooks are removed on exit.
    """

    def __init__(self, m, thread_name: str):
        import threading
        self.m, self.thread_name = m, thread_name
        self.entered, self.release = threading.Event(), threading.Event()
        self.blocks = 0

    def _gate(self, *_):
        import threading
        if threading.current_thread().name == self.thread_name and not self.release.is_set():
            self.entered.set()
            self.release.wait(60)

    def _count(self, *_):
        self.blocks += 1

    def __enter__(self):
        self._hooks = [self.m.model.register_forward_pre_hook(self._gate),
                       self.m.blocks[0].register_forward_pre_hook(self._count)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False
