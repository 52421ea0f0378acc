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
ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=4096),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096),
    "mistral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=4096),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=4096, num_local_experts=4),
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096),
    "qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096, head_dim=16),
    "gemma": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=128, head_dim=16, max_position_embeddings=4096),
    "gemma2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, head_dim=16, max_position_embeddings=4096, sliding_window=8),
    "gemma3_text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, head_dim=16, max_position_embeddings=4096, sliding_window=8),
    "phi": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=4096),
    "phi3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, max_position_embeddings=4096),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=4096, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512),
    "stablelm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=128, max_position_embeddings=4096),
    "olmo": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=4096),
    "olmo2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=4096),
    "cohere": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=128, max_position_embeddings=4096, logit_scale=0.5),
    "starcoder2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, max_position_embeddings=4096),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, n_ctx=512),
    "granite": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=4096, logits_scaling=2.0),
    "opt_project_out": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=4096, word_embed_proj_dim=32, do_layer_norm_before=False),
}


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
