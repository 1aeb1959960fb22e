"""loss.impl=chunked: the same loss and gradients as the model's own loss, from logits that never exist
whole; the same training run; and what it does not cover yet refused by name.

Tolerance: fp32 throughout; the chunked sum adds the token losses in a different order, so loss and gradients
agree to rtol 1e-5 (atol 1e-6 for gradient entries near zero: softmax - one_hot is formed as exp(logit - logsumexp)
rather than by autograd through log_softmax)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ftcore.config import ConfigError, load_config
from ftcore.data.batch import ModelInputs, shifted_labels
from ftcore.errors import TrainError
from ftcore.losses.chunked import HeadTensors, LogitTransform, chunked_linear_cross_entropy
from ftcore.losses.head import choose_loss_impl
from ftcore.losses.objective import causal_lm_objective
from ftcore.model import load_model
from tests.conftest import read_jsonl, run_ft, tiny_run_args
from tests.families import FAMILIES, MOE_FAMILIES, build_family, family_config


def _reference_loss(hidden, head: HeadTensors, targets, transform: LogitTransform, base_kl, base_hidden, base_weight):
    """(CE + base_kl * KL, CE, KL) summed, by autograd through the whole [tokens x vocab] logits."""
    def logits(h, weight, bias=None, lora=None):
        raw = torch.nn.functional.linear(h, weight, bias)
        if lora is not None:
            raw = raw + head.lora_scale * (lora @ head.lora_a.t()) @ head.lora_b.t()
        if transform.softcap is None:
            return raw * transform.scale
        return transform.softcap * torch.tanh(transform.scale * raw / transform.softcap)

    vocab = head.weight.shape[0]
    mine = logits(hidden, head.weight, head.bias, head.lora_in)
    ce = torch.nn.functional.cross_entropy(mine.reshape(-1, vocab), targets.reshape(-1), reduction="sum")
    kl = torch.zeros(())
    if base_kl:
        trained = targets != -100
        fine_log = torch.log_softmax(mine[trained], dim=-1)
        base_log = torch.log_softmax(logits(base_hidden, base_weight)[trained], dim=-1)
        kl = (base_log.exp() * (base_log - fine_log)).sum()
    return ce + base_kl * kl, ce, kl


@pytest.mark.parametrize("base_kl", [0.0, 0.3], ids=["ce", "ce+kl"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.0625), LogitTransform(softcap=3.0)],
                         ids=["plain", "scaled", "softcapped"])
@pytest.mark.parametrize("lora", [False, True], ids=["head", "lora-head"])
def test_the_kernel_equals_the_loss_of_the_whole_logits(lora, transform, base_kl):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=generator, requires_grad=grad)

    hidden, weight, bias = randn(3, 29, 16), randn(101, 16), randn(101)
    lora_a, lora_b = (randn(4, 16), randn(101, 4)) if lora else (None, None)
    base_hidden, base_weight = randn(3, 29, 16, grad=False), randn(101, 16, grad=False)
    labels = torch.randint(0, 101, (3, 29), generator=generator)
    labels[0, :7] = -100  # a prompt
    labels[2, 20:] = -100  # padding
    targets = shifted_labels(labels)

    def head():  # the LoRA input is its own node per graph (the dropout's output in a model)
        return HeadTensors(weight, bias, hidden * 1.0 if lora else None, lora_a, lora_b, 0.5)

    want = _reference_loss(hidden, head(), targets, transform, base_kl, base_hidden, base_weight)
    got = chunked_linear_cross_entropy(hidden, head(), targets, 8, transform, base_kl,
                                       base_hidden if base_kl else None, HeadTensors(base_weight))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    params = [p for p in (hidden, weight, bias, lora_a, lora_b) if p is not None]
    for w, g in zip(torch.autograd.grad(want[0] * 0.3, params), torch.autograd.grad(got[0] * 0.3, params)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _objectives_agree(cfg, model, reference=None, chunk_tokens=16) -> None:
    """causal_lm_objective's full and chunked objectives give `model` the same loss, reported terms and gradient of
    every trained parameter (rtol 1e-5, atol 1e-6), on a batch with a prompt and padding."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it so A's gradient is not zero
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 33:] = -100
    inputs = ModelInputs(ids, labels, attention_mask=torch.ones_like(ids))
    trained = [p for p in model.parameters() if p.requires_grad]
    impl, transform, words = choose_loss_impl("auto", chunk_tokens, cfg.loss.base_kl, model, model, cuda=False)
    assert impl == "chunked", words
    results = {}
    for impl in ("full", "chunked"):
        objective = causal_lm_objective(cfg.loss, lambda m: m, reference, impl, transform, chunk_tokens)
        torch.manual_seed(2)  # the same dropout masks (GPT-2's blocks) in both forwards
        result = objective(model, inputs, normaliser=57)
        results[impl] = (result.terms, torch.autograd.grad(result.loss, trained))
    assert results["chunked"][0].keys() == results["full"][0].keys()
    for key, want in results["full"][0].items():
        torch.testing.assert_close(results["chunked"][0][key], want, rtol=1e-5, atol=1e-7)
    for want, got in zip(results["full"][1], results["chunked"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "lora-on-head", "qlora", "full", "freeze", "lora+base_kl",
                                    "full+base_kl", "gradient-checkpointing"])
def test_the_objective_equals_the_models_loss_on_a_real_model(builtin_model_dir, method):
    """Through the model's own modules: LoRA beside (and on) the head, the 4-bit base, the head trained, frozen
    blocks, the KL to the base (adapter disabled, or the reference copy), checkpointed blocks."""
    settings = {"lora": ["adapter.method=lora"], "qlora": ["adapter.method=qlora"],
                "lora-on-head": ["adapter.method=lora", "adapter.target_modules=[q_proj, v_proj, lm_head]"],
                "full": ["adapter.method=full"], "freeze": ["adapter.method=freeze", "adapter.top_layers=1"],
                "lora+base_kl": ["adapter.method=lora", "loss.base_kl=0.5"],
                "full+base_kl": ["adapter.method=full", "loss.base_kl=0.5"],
                "gradient-checkpointing": ["adapter.method=lora", "model.gradient_checkpointing=true"]}[method]
    cfg = load_config(None, [*settings, "adapter.dropout=0", "model.attn_implementation=sdpa", "train.seed=0"])
    model = load_model(cfg, builtin_model_dir, torch.device("cpu"))
    model.train()
    reference = None
    if method == "full+base_kl":
        reference = load_model(load_config(None, ["adapter.method=full", "model.attn_implementation=sdpa"]),
                               builtin_model_dir, torch.device("cpu")).requires_grad_(False).eval()
        with torch.no_grad():  # the fine-tuned weights have moved away from the base's
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    _objectives_agree(cfg, model, reference)


def test_tied_embeddings_get_both_gradients(builtin_model_dir):
    """The head is the input embedding: both uses' gradients reach the one weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(builtin_model_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _objectives_agree(load_config(None, ["adapter.method=full"]), model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gets_its_own_loss_in_chunks(builtin_model_dir, family):
    """Every supported family's head, logit transform (Gemma-2's softcap, Cohere's logit scale) and router loss
    (Mixtral, Qwen3-MoE with router logits on): auto picks chunked, and it equals the model's own loss and
    gradients. The head is scaled up so that the transforms matter (tolerance relative to each tensor's max)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = family_config(family, len(AutoTokenizer.from_pretrained(builtin_model_dir)))
    if family in MOE_FAMILIES:
        config.output_router_logits = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    cfg = load_config(None, ["adapter.method=full"])
    ids = torch.randint(3, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :9] = -100
    inputs = ModelInputs(ids, labels, attention_mask=torch.ones_like(ids))
    impl, transform, words = choose_loss_impl("auto", 16, 0.0, model, model, cuda=False)
    assert impl == "chunked", words
    results = {}
    for impl in ("full", "chunked"):
        torch.manual_seed(2)  # the same dropout masks (GPT-2's blocks) in both forwards
        loss = causal_lm_objective(cfg.loss, lambda m: m, None, impl, transform, 16)(model, inputs, normaliser=57).loss
        results[impl] = (loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    torch.testing.assert_close(results["chunked"][0], results["full"][0], rtol=1e-5, atol=0)
    for want, got in zip(results["full"][1], results["chunked"][1]):
        if want is not None:
            assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-9


def test_a_head_the_chunked_loss_cannot_reproduce_is_caught(builtin_model_dir):
    """A model that changes its logits after the head in a way no known family does (here: halves them): auto
    falls back to full and says why; an explicit chunked request fails naming the difference."""
    cfg = load_config(None, ["adapter.method=full"])
    model = load_model(cfg, builtin_model_dir, torch.device("cpu"))

    def halve(_module, _args, out):
        out.logits = out.logits * 0.5
        return out

    model.register_forward_hook(halve)
    impl, _, words = choose_loss_impl("auto", 16, 0.0, model, model, cuda=False)
    assert impl == "full" and words.startswith("full (auto: LlamaForCausalLM's logits differ from its decoder")
    with pytest.raises(TrainError, match="loss.impl=chunked: LlamaForCausalLM's logits differ .* use "
                                         "loss.impl=full"):
        choose_loss_impl("chunked", 16, 0.0, model, model, cuda=False)


def assert_chunked_run_equals_full_run(tmp_path, command: tuple[str, ...], *settings: str) -> None:
    """`ft COMMAND` of a 6-step run with each loss_impl: the same step losses, gradient norms (the engine's, over
    every trained parameter and rank) and eval losses (rel 1e-5), and the log says which loss ran."""
    runs = {}
    for impl in ("full", "chunked"):
        out = tmp_path / impl
        args = tiny_run_args(out, "--set", "train.max_steps=6", "--set", f"loss.impl={impl}",
                             "--set", "loss.chunk_tokens=32", *(w for s in settings for w in ("--set", s)))
        proc = run_ft(command[0], *args, *command[1:])
        assert f"loss {impl}" in proc.stdout
        rows = read_jsonl(out / "metrics.jsonl")
        steps = [r for r in rows if "lr" in r]
        runs[impl] = {"loss": [r["loss"] for r in steps], "grad_norm": [r["grad_norm"] for r in steps],
                      "base_kl": [r["base_kl"] for r in steps if "base_kl" in r],
                      "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r]}
    assert len(runs["full"]["loss"]) == 6 and len(runs["full"]["eval_loss"]) == 2
    assert len(runs["full"]["base_kl"]) == (6 if any("base_kl" in s for s in settings) else 0)
    for key, want in runs["full"].items():
        if None in want:  # DeepSpeed reports no gradient norm for some layouts (ZeRO-0 without clipping support)
            assert runs["chunked"][key] == want, key
        else:
            assert runs["chunked"][key] == pytest.approx(want, rel=1e-5), key


@pytest.mark.trains
def test_a_chunked_run_trains_like_a_full_one(tmp_path):
    assert_chunked_run_equals_full_run(tmp_path, ("train",))


@pytest.mark.parametrize("overrides,message", [
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]"],
     "chunked applies to task causal_lm"),
    (["loss.impl=fused", "loss.base_kl=0.1"], "fused does not compute loss.base_kl"),
    (["loss.impl=fused", "adapter.target_modules=[q_proj, lm_head]"], "fused does not cover LoRA on lm_head"),
])
def test_what_an_explicit_loss_impl_cannot_do_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["loss.impl=chunked", *overrides])


def test_fused_is_refused_without_its_kernel_or_a_gpu():
    from ftcore.preflight import check_combinations, check_device

    cfg = load_config(None, ["loss.impl=fused"])
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match=r"fused needs liger-kernel, which is not installed \(pip install"):
            check_combinations(cfg)
    with pytest.raises(ConfigError, match="fused .* needs a CUDA GPU; use auto or chunked"):
        check_device(cfg, cuda=False, bf16_supported=False, device_name="the CPU")


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="fused needs a CUDA GPU and liger-kernel (pip install '.[fused]'); this machine has "
                           f"{'a GPU' if torch.cuda.is_available() else 'no GPU'} and "
                           f"{'liger-kernel' if importlib.util.find_spec('liger_kernel') else 'no liger-kernel'}")
def test_fused_equals_chunked_on_a_gpu(builtin_model_dir):
    """liger-kernel's fused linear cross-entropy gives the chunked loss and gradients (fp32, rtol 1e-4: Triton's
    own summation order)."""
    cfg = load_config(None, ["adapter.method=full", "model.attn_implementation=sdpa"])
    model = load_model(cfg, builtin_model_dir, torch.device("cuda"))
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    labels = ids.clone()
    labels[:, :9] = -100
    inputs = ModelInputs(ids, labels, attention_mask=torch.ones_like(ids))
    impl, transform, words = choose_loss_impl("auto", 16, 0.0, model, model, cuda=True)
    assert impl == "fused", words
    trained = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for impl in ("chunked", "fused"):
        loss = causal_lm_objective(cfg.loss, lambda m: m, None, impl, transform, 16)(model, inputs, normaliser=57).loss
        results[impl] = (loss.detach(), torch.autograd.grad(loss, trained))
    torch.testing.assert_close(results["fused"][0], results["chunked"][0], rtol=1e-4, atol=0)
    for want, got in zip(results["chunked"][1], results["fused"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("layout", [
    ("distributed.zero_stage=3", "adapter.method=lora", "data.packing=true", "loss.base_kl=0.2"),
    ("distributed.zero_stage=3", "adapter.method=full", "data.packing=false"),
    ("distributed.zero_stage=3", "adapter.method=full", "loss.base_kl=0.2"),
    ("distributed.zero_stage=0", "adapter.method=full", "data.packing=true", "loss.base_kl=0.2"),
    ("distributed.zero_stage=2", "adapter.method=lora", "data.packing=false",
     "adapter.target_modules=[q_proj, v_proj, lm_head]", "model.gradient_checkpointing=true"),
    ("distributed.zero_stage=3", "adapter.method=lora", "adapter.target_modules=[q_proj, v_proj, lm_head]"),
], ids=["zero3-lora-packing-base_kl", "zero3-full", "zero3-full-base_kl_partitioned_reference",
        "zero0-full-packing-base_kl", "zero2-lora_on_head-checkpointing",
        "zero3-lora_on_head"])
def test_two_process_chunked_runs_equal_full_ones(tmp_path, layout):
    """2 ranks, the same samples: under ZeRO-3 the head's weight is gathered once per micro batch (frozen with
    LoRA, the KL's base from the adapter disabled; trained with full fine-tuning, its gradient through
    DeepSpeed's hooks; the KL's base a reference copy partitioned by ZeRO-3); ZeRO-0 full with the KL to a whole
    reference copy; LoRA on the head with checkpointed blocks,
    and under ZeRO-3 (its partitioned B trains)."""
    assert_chunked_run_equals_full_run(tmp_path, ("launch", "--nproc", "2"), "checkpoint.every_steps=0", *layout)


@pytest.mark.multiproc
@pytest.mark.trains
def test_a_tied_head_trains_under_zero3_like_a_full_loss(tmp_path, builtin_model_dir):
    """Gemma ties its head to the input embedding: under ZeRO-3 full fine-tuning the one partitioned weight gets
    the chunked loss's gradient and the embedding's, landing once."""
    model = build_family("gemma", tmp_path / "gemma", builtin_model_dir)
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"] is True
    assert_chunked_run_equals_full_run(tmp_path, ("launch", "--nproc", "2"), "checkpoint.every_steps=0",
                                       f"model.name_or_path={model}", "model.attn_implementation=eager",
                                       "distributed.zero_stage=3", "adapter.method=full")
