"""The reconciliation rule for launcher and DeepSpeed-JSON settings, without starting processes: a setting the ft
config leaves unset is taken (and said); one it sets differently is a one-line error naming both places."""

from __future__ import annotations

import json

import pytest

from ftcore.config import load_config
from ftcore.ds_config import build_ds_config
from ftcore.launch_settings import (
    LaunchSettingsError,
    accelerate_choices,
    check_process_count,
    launcher_settings,
    prepare_accelerate_env,
)

HF_ZERO2 = "examples/deepspeed/zero2_hf_trainer.json"
HF_ZERO3 = "examples/deepspeed/zero3_hf_trainer.json"
ACCELERATE_DS = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
                 "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps,offload_optimizer_device,"
                                                "offload_param_device,mixed_precision",
                 "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}


def test_accelerate_settings_fill_unset_fields_and_are_said():
    cfg = load_config(None, [])
    derived, lines = launcher_settings(cfg, ACCELERATE_DS)
    assert {k: v for k, (v, _) in derived.items()} == {
        "model.dtype": "bfloat16", "distributed.zero_stage": 3, "train.grad_accum_steps": 4,
        "distributed.offload": "optimizer"}
    assert "distributed.zero_stage=3 from the accelerate config (zero_stage=3)" in lines
    resolved = load_config(None, [], derived)
    assert (resolved.distributed.zero_stage, resolved.train.grad_accum_steps) == (3, 4)


def test_a_contradiction_names_the_yaml_line_and_the_launcher(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 1.0e-4\ndistributed:\n  zero_stage: 2\n")
    with pytest.raises(LaunchSettingsError) as e:
        launcher_settings(load_config(path, []), ACCELERATE_DS)
    assert str(e.value) == (f"distributed.zero_stage: {path}:4 says 2 but the accelerate config (zero_stage=3) says "
                            "3; make them agree (or drop one)")


def test_equal_values_in_both_places_are_fine():
    cfg = load_config(None, ["distributed.zero_stage=3", "model.dtype=bfloat16"])
    derived, _ = launcher_settings(cfg, ACCELERATE_DS)
    assert "distributed.zero_stage" not in derived and "model.dtype" not in derived


def test_default_precision_no_is_not_a_choice_unless_the_accelerate_config_says_it():
    plain = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}
    assert accelerate_choices(plain) == []
    said = {**plain, "ACCELERATE_CONFIG_DS_FIELDS": "mixed_precision"}
    assert [c.field for c in accelerate_choices(said)] == ["model.dtype"]


def test_our_own_launch_is_not_reconciled():
    assert accelerate_choices({**ACCELERATE_DS, "FT_LAUNCHER": "ft"}) == []


def test_single_process_accelerate_launch_asked_for_more_is_refused():
    check_process_count({"ACCELERATE_MIXED_PRECISION": "no"})  # plain `accelerate launch` of one process: fine
    with pytest.raises(LaunchSettingsError, match="started a single process although more were asked for"):
        check_process_count({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


def test_prepare_env_removes_what_was_absorbed_and_runs_deepspeed():
    env = {**ACCELERATE_DS, "ACCELERATE_USE_CPU": "True", "ACCELERATE_DEEPSPEED_CONFIG_FILE": HF_ZERO2}
    prepare_accelerate_env(env, "bf16", cuda=False)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_USE_CPU"] == "false"
    assert not any(k.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_", "ACCELERATE_CONFIG_DS")) for k in env)
    with pytest.raises(LaunchSettingsError, match="--cpu"):
        prepare_accelerate_env({"ACCELERATE_USE_CPU": "True"}, "no", cuda=True)


@pytest.mark.parametrize("path,stage,offload", [(HF_ZERO2, 2, "none"), (HF_ZERO3, 3, "none")])
def test_hf_trainer_jsons_work_unchanged(path, stage, offload):
    cfg = load_config(None, [f"distributed.deepspeed_config={path}", "train.micro_batch_size=4",
                             "train.grad_accum_steps=2"])
    derived, lines = launcher_settings(cfg, {})
    cfg = load_config(None, [f"distributed.deepspeed_config={path}", "train.micro_batch_size=4",
                             "train.grad_accum_steps=2"], derived)
    assert (cfg.distributed.zero_stage, cfg.distributed.offload) == (stage, offload)
    ds = build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda=False, world_size=2,
                         hidden_size=64)
    original = json.loads(open(path).read())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == cfg.optimizer.max_grad_norm
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == stage and ds["zero_optimization"]["reduce_bucket_size"] == 4096
    # The user's tuning knobs stay; the optimizer and schedule are the recipe's own (optimizer.lr, warmup, cosine).
    assert ds["zero_optimization"]["contiguous_gradients"] == original["zero_optimization"]["contiguous_gradients"]
    assert "optimizer" not in ds and "scheduler" not in ds
    assert "auto" not in json.dumps(ds)


def write_json(tmp_path, tree: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(tree, indent=1))
    return str(path)


def test_a_json_value_is_taken_for_an_unset_field_and_refused_against_a_set_one(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8,
                                 "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}})
    cfg = load_config(None, [f"distributed.deepspeed_config={path}"])
    derived, _ = launcher_settings(cfg, {})
    assert {k: v for k, (v, _) in derived.items()} == {"distributed.zero_stage": 1, "train.micro_batch_size": 8,
                                                       "model.dtype": "bfloat16", "optimizer.lr": 1e-5}
    cfg = load_config(None, [f"distributed.deepspeed_config={path}", "train.micro_batch_size=2"])
    with pytest.raises(LaunchSettingsError) as e:
        launcher_settings(cfg, {})
    assert str(e.value) == (f"train.micro_batch_size: --set says 2 but {path}: train_micro_batch_size_per_gpu=8 "
                            "says 8; make them agree (or drop one)")


@pytest.mark.parametrize("tree,message", [
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb'"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}},
     "optimizer.params.betas=[0.9, 0.95]"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "NVMe offload"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
     "stage3_gather_16bit_weights_on_model_save=false"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "OneCycle"}}, "scheduler.type='OneCycle'"),
])
def test_json_settings_ft_cannot_honour_are_one_line_errors(tmp_path, tree, message):
    path = write_json(tmp_path, tree)
    with pytest.raises(LaunchSettingsError) as e:
        launcher_settings(load_config(None, [f"distributed.deepspeed_config={path}"]), {})
    assert str(e.value).startswith(path) and message in str(e.value) and "\n" not in str(e.value)


def test_a_json_train_batch_size_that_contradicts_the_effective_batch(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": 64})
    cfg = load_config(None, [f"distributed.deepspeed_config={path}"])
    with pytest.raises(LaunchSettingsError, match=r"train_batch_size=64, but train.micro_batch_size 1 x "
                                                  r"train.grad_accum_steps 1 x processes makes 2"):
        build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda=False, world_size=2)


def test_a_broken_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(LaunchSettingsError, match=rf"^{path}:3: invalid JSON"):
        launcher_settings(load_config(None, [f"distributed.deepspeed_config={path}"]), {})
