"""Attention backend choice, and the GPU path (bf16 + NCCL), which is skipped with its reason on CPU machines."""

import pytest
import torch

from ftcore.model import ModelError, flash_attn_available, resolve_attn_implementation
from tests.conftest import read_jsonl, run_ft, tiny_run_args


def test_auto_picks_sdpa_without_cuda_or_flash_attn():
    assert resolve_attn_implementation("auto", cuda=False) == "sdpa"
    expected = "flash_attention_2" if flash_attn_available() else "sdpa"
    assert resolve_attn_implementation("auto", cuda=True) == expected
    assert resolve_attn_implementation("eager", cuda=False) == "eager"


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_is_a_clear_error():
    with pytest.raises(ModelError, match="flash_attention_2 needs flash-attn"):
        resolve_attn_implementation("flash_attention_2", cuda=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_bf16_lora_trains_on_gpu_with_nccl(tmp_path):
    out = tmp_path / "gpu"
    run_ft("train", *tiny_run_args(out, "--set", "model.dtype=bfloat16", "--set", "train.max_steps=6"))
    rows = read_jsonl(out / "audit" / "rank0.jsonl")
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
