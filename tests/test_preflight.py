"""Pre-flight: impossible or unsupported configs fail before any process starts (or, for the device, before the
model loads) with the field and the fix. Post-flight: a non-finite loss or gradient stops the run with the step
and the last good checkpoint."""

from __future__ import annotations

import os

import pytest

from ftcore.config import ConfigError, load_config
from ftcore.preflight import check_device
from tests.conftest import ft_in_process, run_ft, tiny_run_args

CASES = [
    (["adapter.method=qlora", "distributed.zero_stage=3", "adapter.quant_storage=uint8"],
     "adapter.quant_storage: uint8 under ZeRO-3 leaves the packed 4-bit weights whole on every rank"),
    (["adapter.method=qlora", "distributed.zero_stage=3", "adapter.quant_storage=bfloat16"],
     "set adapter.quant_storage=auto (or float32)"),
    (["adapter.quant_storage=bfloat16"], "adapter.quant_storage: applies to adapter.method=qlora only"),
    (["adapter.method=qlora", "distributed.zero_stage=3", "distributed.offload=all"],
     "distributed.offload: 'all' (ZeRO-3 parameter offload) with adapter.method=qlora is not supported"),
    (["model.attn_implementation=flash_attention_2"],
     "model.attn_implementation: flash_attention_2 needs flash-attn, which is not installed"),
    (["data.max_seq_len=2048"], "data.max_seq_len: 2048 exceeds the model's max_position_embeddings (1024)"),
    (["train.effective_batch_size=32"], "train.effective_batch_size: 32, but micro_batch_size 8 x grad_accum_steps "
                                        "1 x 2 processes = 16; set train.grad_accum_steps=2"),
    (["train.effective_batch_size=20"], "20 is not a multiple of micro_batch_size x processes = 16"),
]


@pytest.mark.parametrize("overrides,message", CASES)
def test_preflight_errors_fire_before_launch(overrides, message):
    args = [w for o in overrides for w in ("--set", o)]
    proc = ft_in_process("launch", "examples/chat-demo.yaml", "--nproc", "2", "--dry-run", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_ft_slurm_checks_the_batch_for_its_world():
    common = ("slurm", "examples/chat-demo.yaml", "--nodes", "4", "--gpus-per-node", "8", "--dry-run")
    assert ft_in_process(*common, "--set", "train.effective_batch_size=256").returncode == 0  # 8 x 1 x 32
    proc = ft_in_process(*common, "--set", "train.effective_batch_size=512", check=False)
    assert proc.returncode == 2
    assert "micro_batch_size 8 x grad_accum_steps 1 x 32 processes = 256; set train.grad_accum_steps=2" in proc.stderr


@pytest.mark.parametrize("dtype,cuda,bf16,message", [
    ("bfloat16", True, False, "model.dtype: bfloat16 is not supported by Tesla V100"),
    ("float16", False, False, "model.dtype: float16 training needs a CUDA GPU"),
])
def test_device_checks(dtype, cuda, bf16, message):
    cfg = load_config(None, [f"model.dtype={dtype}"])
    with pytest.raises(ConfigError, match=message):
        check_device(cfg, cuda=cuda, bf16_supported=bf16, device_name="Tesla V100")
    check_device(load_config(None, []), cuda=cuda, bf16_supported=bf16, device_name="x")  # float32 is fine


def test_float16_on_cpu_fails_in_the_recipe_before_the_model_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = run_ft("train", *tiny_run_args(tmp_path / "run", "--set", "model.dtype=float16"), check=False, env=env,
                  trains=False)
    assert proc.returncode == 1 and "model.dtype: float16 training needs a CUDA GPU" in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout


@pytest.mark.trains
def test_non_finite_training_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = tmp_path / "run"
    proc = run_ft("train", *tiny_run_args(out, "--set", "optimizer.lr=1e30", "--set", "optimizer.max_grad_norm=0",
                                          "--set", "checkpoint.every_steps=1", "--set", "optimizer.warmup_steps=0",
                                          "--set", "train.max_steps=30", "--set", "evaluation.every=0"),
                  check=False, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if "non-finite" in ln]
    assert line, proc.stderr[-2000:]
    step = int(line[0].split(" at step ")[1].split()[0].rstrip(";"))
    assert f"last good checkpoint: {out / 'checkpoints' / f'step-{step - 1:06d}'}" in line[0]
    assert not (out / "final").exists()
