"""QLoRA's 4-bit format in one place: NF4 with double quantization in blocks of 64 (bitsandbytes' defaults, what
transformers' 4-bit loading applies), as the config training loads the base with, and as the round trip the
export applies to the base so the merged model is the function that was trained."""

from __future__ import annotations

from typing import Any, Optional

import torch

NF4_BLOCKSIZE = 64


def nf4_quantization_config(compute_dtype: torch.dtype, quant_storage: Optional[torch.dtype] = None) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA: NF4, double quantization, computing in `compute_dtype`;
    `quant_storage`: the dtype the packed weights are stored in (uint8 unless ZeRO-3 needs the model's dtype)."""
    from transformers import BitsAndBytesConfig

    settings = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **settings)


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """dequant(NF4(W)) exactly as bitsandbytes computes it when transformers loads the base in 4 bit
    (double quantization, blocksize 64); this is the weight the QLoRA adapter was trained against."""
    import bitsandbytes.functional as bnbf

    w = weight.to(compute_dtype).contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state).to(compute_dtype)
