"""Tiny models of every causal-LM family ft supports by test (built from a config, no download), sharing the built-in
tokenizer's vocabulary. `build_family(name, out, tokenizer_dir)` writes an ordinary HF model directory."""

from __future__ import annotations

from pathlib import Path

# model_type -> config fields beyond the shared ones (names differ between families).
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=256),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=256),
    "phi3": dict(pad_token_id=0),
    "gpt_neox": dict(num_key_value_heads=None),
    "olmo2": {},
    "granite": {},
    "starcoder2": {},
    "cohere": {},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, hidden_size=None, intermediate_size=None,
                 num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                 max_position_embeddings=None),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, num_key_value_heads=None, intermediate_size=None),
    "phi": dict(num_key_value_heads=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def family_config(name: str, vocab_size: int):
    from transformers import AutoConfig

    fields = {**_COMMON, **FAMILIES[name]}
    fields = {k: v for k, v in fields.items() if v is not None}
    config = AutoConfig.for_model(name, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **fields)
    return config


def build_family(name: str, out: Path, tokenizer_dir: str, dtype: str = "float32") -> Path:
    """A tiny randomly initialised `name` model (seed 0) saved with the built-in tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(name, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
