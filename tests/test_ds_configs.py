"""Every ds_configs/ template is valid, fully filled from the typed config, and accepted by DeepSpeed."""

import json
from pathlib import Path

import pytest

from ftcore.config import load_config
from ftcore.ds_config import (
    build_ds_config,
    build_inference_ds_config,
    fill_template,
    load_template,
    template_name,
    template_names,
)

ROOT = Path(__file__).resolve().parents[1]
COMBOS = [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"), (3, "none"),
          (3, "optimizer"), (3, "all")]


def test_every_template_file_is_used_and_every_combination_has_one():
    on_disk = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert on_disk == template_names()
    assert sorted(template_name(s, o) for s, o in COMBOS) == on_disk


@pytest.mark.parametrize("stage, offload", COMBOS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_built_config_matches_typed_config(stage, offload, dtype):
    cfg = load_config(None, [f"distributed.zero_stage={stage}", f"distributed.offload={offload}",
                             f"model.dtype={dtype}", "train.micro_batch_size=3", "train.grad_accum_steps=5",
                             "optimizer.max_grad_norm=0.7", "distributed.zero3_param_persistence_threshold=0"])
    ds = build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda=False)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is (dtype == "bfloat16")
    assert ds["fp16"]["enabled"] is (dtype == "float16")
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is (offload in ("optimizer", "all"))
    assert ("offload_param" in zero) is (offload == "all")
    if stage == 3:
        assert zero["stage3_param_persistence_threshold"] == 0
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("stage, offload", COMBOS)
def test_deepspeed_accepts_each_config(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, [f"distributed.zero_stage={stage}", f"distributed.offload={offload}",
                             "train.micro_batch_size=2", "train.grad_accum_steps=4"])
    ds = build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda=False)
    ds["train_batch_size"] = 2 * 4 * 1  # world of one: DeepSpeed checks the batch arithmetic
    parsed = DeepSpeedConfig(ds, world_size=1) if "world_size" in DeepSpeedConfig.__init__.__code__.co_varnames \
        else DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.train_micro_batch_size_per_gpu == 2


@pytest.mark.parametrize("stage, offload", [(0, "none"), (3, "none"), (3, "optimizer"), (3, "all")])
def test_the_forward_only_config_has_no_optimizer_and_deepspeed_accepts_it(stage, offload):
    """ft eval's DeepSpeed config: the run's stage template, one sample per forward, float32, no optimizer or
    optimizer offload (nothing trains), parameter offload kept (a model no rank can hold)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, [f"distributed.zero_stage={stage}", f"distributed.offload={offload}",
                             "model.dtype=bfloat16", "train.micro_batch_size=4"])
    ds = build_inference_ds_config(cfg.distributed, cuda=False, world_size=2, hidden_size=64)
    assert "auto" not in json.dumps(ds) and "optimizer" not in ds and "scheduler" not in ds
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and "offload_optimizer" not in zero
    assert ("offload_param" in zero) is (offload == "all")
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    parsed = DeepSpeedConfig(ds, world_size=2) if "world_size" in DeepSpeedConfig.__init__.__code__.co_varnames \
        else DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == stage


def test_unknown_auto_is_an_error():
    cfg = load_config(None)
    template = load_template("zero2.json")
    template["zero_optimization"]["reduce_bucket_size"] = "auto"
    fills = {k: 1 for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                            "bf16.enabled", "fp16.enabled")}
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size is 'auto'"):
        fill_template(template, fills, "zero2.json")
    # the real template fills
    assert build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda=False)
