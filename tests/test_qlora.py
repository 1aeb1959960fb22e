"""QLoRA for real: bitsandbytes NF4 with double quantization on CPU, trained through `ft launch` single-process,
ZeRO-2 and ZeRO-3 (2 processes, gloo). Under ZeRO-3 the packed 4-bit weights are stored in the compute dtype and
really partitioned; the saved adapter equals the one consolidated from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ft_in_process, plan_matches_engine, read_jsonl, tiny_args, tiny_run_args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

QLORA = ("--set", "adapter.method=qlora", "--set", "train.max_steps=12", "--set", "checkpoint.every_steps=6")
RUNS = {
    "single": ((), 1),
    "zero2": ((), 2),
    "zero3": (("--set", "distributed.zero_stage=3", "--set", "distributed.zero3_param_persistence_threshold=0",
               "--set", "model.gradient_checkpointing=true"), 2),
    # What GPU users run: bf16 compute, packed weights stored as bf16 and partitioned by ZeRO-3.
    "zero3_bf16": (("--set", "distributed.zero_stage=3", "--set", "distributed.zero3_param_persistence_threshold=0",
                    "--set", "model.dtype=bfloat16"), 2),
}


@pytest.fixture(scope="module")
def runs(training_runs):
    def get(name: str) -> Path:
        extra, nproc = RUNS[name]
        return training_runs.get(*tiny_args(*QLORA, *extra), nproc=nproc)[0]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_qlora_trains_on_an_nf4_base(runs, name):
    out = runs(name)
    world = json.loads((out / "audit" / "rank0_world.json").read_text())
    assert world["quantized_params"] == 4 * 7  # every linear layer of the 4 blocks is 4-bit
    assert world["quant_types"] == ["nf4+double"]
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert len(adapter) == 4 * 7 * 2 and all(t.numel() > 0 for t in adapter.values())
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("name,storage", [("zero3", "torch.float32"), ("zero3_bf16", "torch.bfloat16")])
def test_zero3_partitions_the_4bit_weights(runs, name, storage):
    out = runs(name)
    ranks = [json.loads((out / "audit" / f"rank{r}_world.json").read_text()) for r in (0, 1)]
    for world in ranks:
        # Stored in the compute dtype, so ZeRO-3 splits them: each rank holds half the bytes.
        assert world["quantized_storage_dtype"] == storage
        assert world["quantized_local_bytes"] * 2 == world["quantized_full_bytes"]
    # 724,992 logical 4-bit weights in the 28 layers = 362,496 packed bytes.
    assert ranks[0]["quantized_full_bytes"] == 362_496
    single = json.loads((runs("single") / "audit" / "rank0_world.json").read_text())
    assert single["quantized_storage_dtype"] == "torch.uint8"  # without ZeRO-3: bitsandbytes' usual storage
    assert single["quantized_local_bytes"] == single["quantized_full_bytes"] == 362_496


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_saved_adapter_equals_the_one_in_the_checkpoint(runs, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ftcore.export.zero import ZeroCheckpoint, lora_state_to_adapter

    out = runs(name)
    ckpt = out / "checkpoints" / "step-000012"
    ours = lora_state_to_adapter(dict(ZeroCheckpoint(ckpt).iter_tensors(budget_bytes=1 << 20)))
    deepspeed_view = lora_state_to_adapter(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine"))
    saved = load_file(out / "final" / "adapter_model.safetensors")
    saved = {k.replace("base_model.model.", ""): v for k, v in saved.items()}
    ours = {k.replace("base_model.model.", ""): v for k, v in ours.items()}
    deepspeed_view = {k.replace("base_model.model.", ""): v for k, v in deepspeed_view.items()}
    assert set(saved) == set(ours) == set(deepspeed_view)
    for key in saved:
        assert torch.equal(saved[key], ours[key]) and torch.equal(saved[key], deepspeed_view[key]), key


def test_qlora_adapter_exports_onto_the_dequantized_base(runs, tmp_path):
    out = runs("zero3")
    proc = ft_in_process("export", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged"))
    assert "merge base: quantized" in proc.stdout and "verification: passed" in proc.stdout


@pytest.mark.parametrize("name", list(RUNS))
def test_ft_plan_predicts_the_bytes_each_rank_holds(runs, name):
    """Packed 4-bit storage (uint8, or the compute dtype partitioned under ZeRO-3) and the adapter's optimizer
    states, as `ft plan` predicts them, equal what the real engine held."""
    extra, nproc = RUNS[name]
    out = runs(name)
    plan_matches_engine(tiny_run_args(out, *QLORA, *extra), out, world=nproc)
