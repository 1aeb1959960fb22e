"""train.loss_impl=chunked: the same loss and gradients as the model's own loss, from logits that never exist
whole; the same training run; and what it does not cover yet refused by name.

Tolerance: fp32 throughout; the chunked sum adds the token losses in a different order, so loss and gradients
agree to rtol 1e-5 (atol 1e-6 for gradient entries near zero: softmax - one_hot is formed as exp(logit - logsumexp)
rather than by autograd through log_softmax)."""

from __future__ import annotations

import pytest
import torch

from ftcore.config import ConfigError, load_config
from ftcore.model import load_model
from ftcore.train.chunked_loss import chunked_linear_cross_entropy, shifted_labels
from ftcore.train.objective import CausalLMLoss, ChunkedCausalLMLoss
from tests.conftest import read_jsonl, run_ft, tiny_run_args


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_kernel_equals_cross_entropy_of_the_whole_logits(with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 29, 16, generator=generator, requires_grad=True)
    weight = torch.randn(101, 16, generator=generator, requires_grad=True)
    bias = torch.randn(101, generator=generator, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 101, (3, 29), generator=generator)
    labels[0, :7] = -100  # a prompt
    labels[2, 20:] = -100  # padding
    targets = shifted_labels(labels)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), targets.reshape(-1), reduction="sum")
    chunked = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=8, bias=bias)
    params = [p for p in (hidden, weight, bias) if p is not None]
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    for want, got in zip(torch.autograd.grad(full * 0.3, params), torch.autograd.grad(chunked * 0.3, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full", "full-tied"])
def test_the_objective_equals_the_models_loss_on_a_real_model(builtin_model_dir, method):
    if method == "full-tied":  # the head is the input embedding: both uses' gradients reach one weight
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(builtin_model_dir, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        cfg = load_config(None, [f"adapter.method={method}", "adapter.dropout=0", "model.attn_implementation=sdpa",
                                 "train.seed=0", "train.loss_impl=chunked", "train.loss_chunk_tokens=16"])
        model = load_model(cfg, builtin_model_dir, torch.device("cpu"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it so A's gradient is not zero
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :9] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "use_cache": False}
    trained = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for name, objective in (("full", CausalLMLoss()), ("chunked", ChunkedCausalLMLoss(lambda m: m, 16))):
        loss = objective(model, inputs, normaliser=57).loss
        results[name] = (loss.detach(), torch.autograd.grad(loss, trained))
    torch.testing.assert_close(results["chunked"][0], results["full"][0], rtol=1e-5, atol=0)
    for want, got in zip(results["full"][1], results["chunked"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def assert_chunked_run_equals_full_run(tmp_path, command: tuple[str, ...], *settings: str) -> None:
    """`ft COMMAND` of a 6-step run with each loss_impl: the same step losses and eval losses (rel 1e-5), and the
    log says which loss ran."""
    losses = {}
    for impl in ("full", "chunked"):
        out = tmp_path / impl
        args = tiny_run_args(out, "--set", "train.max_steps=6", "--set", f"train.loss_impl={impl}",
                             "--set", "train.loss_chunk_tokens=32", *(w for s in settings for w in ("--set", s)))
        proc = run_ft(command[0], *args, *command[1:])
        assert f"loss {impl}" in proc.stdout
        rows = read_jsonl(out / "metrics.jsonl")
        losses[impl] = ([r["loss"] for r in rows if "lr" in r], [r["eval_loss"] for r in rows if "eval_loss" in r])
    assert len(losses["full"][0]) == 6 and len(losses["full"][1]) == 2
    for want, got in zip(losses["full"], losses["chunked"]):
        assert got == pytest.approx(want, rel=1e-5)


def test_a_chunked_run_trains_like_a_full_one(tmp_path):
    assert_chunked_run_equals_full_run(tmp_path, ("train",))


@pytest.mark.parametrize("overrides,message", [
    (["distributed.zero_stage=3", "adapter.method=full"], "chunked with adapter.method=full under ZeRO-3"),
    (["train.base_kl=0.1"], "chunked with train.base_kl is not supported in this release"),
    (["adapter.target_modules=[q_proj, lm_head]"], "puts LoRA on lm_head"),
])
def test_what_chunked_does_not_cover_yet_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.loss_impl=chunked", *overrides])


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [
    ("distributed.zero_stage=3", "adapter.method=lora", "data.packing=true"),
    ("distributed.zero_stage=2", "adapter.method=full", "data.packing=false"),
])
def test_two_process_chunked_runs_equal_full_ones(tmp_path, layout):
    """2 ranks, the same samples: ZeRO-3 with LoRA (the head's weight gathered once per micro batch) and packing;
    ZeRO-2 full fine-tuning (the head's weight trains)."""
    assert_chunked_run_equals_full_run(tmp_path, ("launch", "--nproc", "2"), "checkpoint.every_steps=0", *layout)
