"""The floating-point dtypes ft accepts by name (model.dtype, --dtype, config.json's dtype): the one table."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The name DTYPES knows `dtype` by (what config.json's dtype field holds)."""
    return {v: k for k, v in DTYPES.items()}[dtype]
