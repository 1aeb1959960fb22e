"""Small GGUF files written in the tests with the `gguf` package's writer, as llama.cpp's converter lays them out:
llama.cpp tensor names, q/k rows permuted for its rotary layout, the SentencePiece vocabulary as tokenizer metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF Llama tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module>.weight
    return f"blk.{parts[2]}.{LLAMA_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows for its rotary layout (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, out: Path, qtype: str = "F32", architecture: str = "llama",
                     chat_template: Optional[str] = None, weights_scale: float = 1.0) -> Path:
    """The HF Llama at `model_dir` (its SentencePiece tokenizer.model beside the weights, or the built-in one) as a
    GGUF file. qtype: F32, F16 or a gguf quant type (Q8_0, Q4_K, ...) for every 2-D tensor whose rows fit its
    blocks (others stay F32, as llama.cpp does)."""
    import json

    import gguf
    import sentencepiece as spm
    from safetensors.numpy import load_file

    from ftcore.builtin import _sentencepiece_model

    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("tiny test llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 1e4))
    writer.add_rope_dimension_count(config["head_dim"])

    sp = spm.SentencePieceProcessor(model_file=str(_sentencepiece_model()))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    quant = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[quant][0]
    for name in sorted(tensors):
        w = tensors[name].astype(np.float32) * weights_scale
        if name.endswith("q_proj.weight"):
            w = permute_rotary(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute_rotary(w, config["num_key_value_heads"])
        if w.ndim == 2 and qtype not in ("F32", "F16") and w.shape[-1] % block == 0:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, quant), raw_dtype=quant)
        elif w.ndim == 2 and qtype == "F16":
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_raw_gguf(out: Path, architecture: str, tensor_type: str = "F32") -> Path:
    """A minimal GGUF with one tensor of `tensor_type` (raw bytes): for the refusals of an unreadable architecture or
    quant type."""
    import gguf

    writer = gguf.GGUFWriter(str(out), architecture)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
