"""adapter.method=freeze (layer-wise fine-tuning) and optimizer.layer_lr_decay, with real DeepSpeed (2 processes):
only the chosen weights change, the frozen ones stay bit-identical and hold no optimizer state, and every
weight trains at the rate its depth gives it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cached_launches, plan_matches_engine, read_jsonl, tiny_run_args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

FREEZE = ("--set", "adapter.method=freeze", "--set", "adapter.trainable=[lm_head, 'layers\\.[23]\\.']",
          "--set", "optimizer.layer_lr_decay=0.5", "--set", "optimizer.lr=1e-3", "--set", "optimizer.weight_decay=0.01")
RUNS = {"zero2": FREEZE, "zero3": (*FREEZE, "--set", "distributed.zero_stage=3",
                                   "--set", "distributed.zero3_param_persistence_threshold=0"),
        "top1_zero0": ("--set", "adapter.method=freeze", "--set", "adapter.top_layers=1", "--set",
                       "distributed.zero_stage=0")}


@pytest.fixture(scope="module")
def runs(training_runs):
    return cached_launches(training_runs, RUNS)


def chosen(name: str, name_rule: str) -> bool:
    if name_rule == "top1_zero0":  # the last block and everything above it
        return "layers.3." in name or name in ("model.norm.weight", "lm_head.weight")
    return name == "lm_head.weight" or re.search(r"layers\.[23]\.", name) is not None


@pytest.mark.parametrize("name", list(RUNS))
def test_only_the_chosen_weights_train(runs, name, builtin_model_dir):
    out = runs(name)
    base = load_file(f"{builtin_model_dir}/model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == base.keys()
    trained = [k for k in final if chosen(k, name)]
    assert trained and len(trained) < len(final)
    for key in final:
        if chosen(key, name):
            assert not torch.equal(final[key], base[key]), f"{key} did not train"
        else:
            assert torch.equal(final[key], base[key]), f"{key} is frozen but changed"
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_frozen_weights_hold_no_optimizer_state(runs, name):
    """`ft plan` counts the optimizer states of the trainable weights only (in their per-rate groups); the real
    engine holds exactly that."""
    out = runs(name)
    plan_matches_engine(tiny_run_args(out, *RUNS[name]), out, world=2)


def test_layer_lr_decay_gives_each_weight_its_rate(runs):
    out = runs("zero2")
    world = json.loads((out / "audit" / "rank0_world.json").read_text())
    rates = {}
    for group in world["optimizer_groups"]:
        for n in group["names"]:
            rates[n] = (group["initial_lr"], group["weight_decay"])
    # 4 blocks: block 3 at lr, block 2 at lr * 0.5; the head above the blocks at lr. Norms get no decay.
    assert {n for n in rates} == {n for n in rates if chosen(n, "zero2")}
    for n, (lr, decay) in rates.items():
        expected = 1e-3 * (0.5 if "layers.2." in n else 1.0)
        assert lr == pytest.approx(expected, rel=1e-12), n
        assert decay == (0.0 if "norm" in n else 0.01), n
    assert sum("layers.2." in n for n in rates) == sum("layers.3." in n for n in rates) == 9
    # Printed at start: blocks 2 and 3 (181,504 each) and the head (128 x 32,000).
    assert "trainable 4,459,008 / 8,918,144 params" in (out / "launch.log").read_text()
