"""loss.base_kl: beta * KL(base || fine-tuned) on the trained tokens, logged apart from the task loss. LoRA takes
the base from the same weights with the adapter disabled; full fine-tuning keeps a frozen reference copy."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cached_launches, read_jsonl

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

STEPS = ("--set", "train.max_steps=12", "--set", "optimizer.lr=3e-3", "--set", "optimizer.warmup_steps=0",
         "--set", "checkpoint.every_steps=0", "--set", "evaluation.every=0")
RUNS = {"plain": (), "beta0": ("--set", "loss.base_kl=0.0"), "beta1": ("--set", "loss.base_kl=1.0"),
        "beta20": ("--set", "loss.base_kl=20.0"),
        "full_beta1": ("--set", "loss.base_kl=1.0", "--set", "adapter.method=full", "--set", "optimizer.lr=1e-3")}


@pytest.fixture(scope="module")
def runs(training_runs):
    # beta0 is the default made explicit: the same resolved config as plain, run apart so the test compares two
    # runs, not one run with itself.
    return cached_launches(training_runs, RUNS, *STEPS, variants={"beta0": "base_kl set explicitly"})


def steps(out):
    return [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]


def test_base_kl_zero_is_plain_training_exactly(runs):
    from safetensors.torch import load_file

    plain, zero = runs("plain"), runs("beta0")
    assert [m["loss"] for m in steps(plain)] == [m["loss"] for m in steps(zero)]
    assert all("base_kl" not in m for m in steps(zero))
    a, b = (load_file(out / "final" / "adapter_model.safetensors") for out in (plain, zero))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["beta1", "full_beta1"])
def test_kl_is_zero_before_the_first_update_and_logged_apart(runs, name):
    """Before the first update the fine-tuned model is the base (LoRA's B starts at zero; the full run's reference
    is a copy of its initial weights): KL is exactly 0 and the task loss equals the plain run's."""
    rows = steps(runs(name))
    assert rows[0]["base_kl"] == 0.0
    if name == "beta1":
        assert rows[0]["loss"] == steps(runs("plain"))[0]["loss"]
    assert all(r["base_kl"] >= 0 for r in rows) and max(r["base_kl"] for r in rows[1:]) > 0


def test_a_large_beta_keeps_the_model_closer_to_the_base(runs, builtin_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 523, 28766, 1838, 28766, 28767, 13, 3195, 349, 272, 5565, 302, 4843, 28804, 13,
                         523, 28766, 489, 11143, 28766, 28767, 13]])
    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    with torch.no_grad():
        base_log = torch.log_softmax(base(ids).logits.float(), -1)

    def kl_to_base(name):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                          runs(name) / "final").eval()
        with torch.no_grad():
            tuned_log = torch.log_softmax(model(ids).logits.float(), -1)
        return float((base_log.exp() * (base_log - tuned_log)).sum(-1).mean())

    free, held = kl_to_base("beta0"), kl_to_base("beta20")
    assert held < 0.5 * free, (held, free)
    # The run's own KL (per trained token) is smaller with the large beta too.
    assert steps(runs("beta20"))[-1]["base_kl"] < 0.5 * steps(runs("beta1"))[-1]["base_kl"]
