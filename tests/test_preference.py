"""task preference: pairs tokenized and truncated as documented; every objective's loss and gradients equal its
paper's formula computed from the model's whole logits; runs train, accumulate like data parallelism and resume
exactly.

Tolerance of the formula tests: fp32; the chunked log-probs sum in another order than log_softmax over the whole
logits, so losses agree to rtol 1e-5 and every gradient tensor to 1e-5 of its largest entry (IPO's quadratic
loss scales the rounding of the log-probs by its derivative, up to 2 x (margin - 1 / (2 beta)))."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from ftcore.config import ConfigError, FieldNames, load_config
from ftcore.data.formats import IGNORE_INDEX, RecordError, RecordSpec
from ftcore.data.preference import collate_pairs, tokenize_pair
from ftcore.losses.chunked import LogitTransform
from ftcore.losses.preference import PreferenceLoss
from ftcore.model import load_model
from ftcore.train.sequence_parallel import model_inputs
from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_run_args

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]
SPEC = RecordSpec("preference", "completion", FieldNames())


def repeat_task(path, count: int, seed: int, chat: bool = False):
    """'Repeat: w1 w2 w3' -> chosen repeats the words, rejected gives other ones: a pattern the tiny model can
    learn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            words = rng.sample(WORDS, 3)
            wrong = rng.sample([w for w in WORDS if w not in words], 3)
            if chat:
                record = {"prompt": [{"role": "user", "content": "Repeat: " + " ".join(words)}],
                          "chosen": [{"role": "assistant", "content": " ".join(words)}],
                          "rejected": [{"role": "assistant", "content": " ".join(wrong)}]}
            else:
                record = {"prompt": "Repeat: " + " ".join(words) + "\nAnswer:", "chosen": " " + " ".join(words),
                          "rejected": " " + " ".join(wrong)}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


# ------------------------------------------------------------------------------------------------ data
def test_a_text_pair_shares_its_prompt_and_trains_only_the_responses(tokenizer):
    pair = tokenize_pair({"prompt": "Repeat: a b", "chosen": " a b", "rejected": " c d e"}, SPEC, tokenizer, 64)
    prompt = [tokenizer.bos_token_id] + tokenizer("Repeat: a b", add_special_tokens=False)["input_ids"]
    for sample, text in ((pair.chosen, " a b"), (pair.rejected, " c d e")):
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert sample.input_ids == prompt + response
        assert sample.labels == [IGNORE_INDEX] * len(prompt) + response
    assert not pair.truncated


def test_chat_pairs_and_whole_conversations_give_the_same_tokens(tokenizer):
    user = [{"role": "user", "content": "Repeat: a b"}]
    split = tokenize_pair({"prompt": user, "chosen": [{"role": "assistant", "content": "a b"}],
                           "rejected": "c d"}, SPEC, tokenizer, 128)
    whole = tokenize_pair({"chosen": user + [{"role": "assistant", "content": "a b"}],
                           "rejected": user + [{"role": "assistant", "content": "c d"}]}, SPEC, tokenizer, 128)
    assert split == whole
    trained = [t for t, label in zip(split.chosen.input_ids, split.chosen.labels) if label != IGNORE_INDEX]
    assert "a b" in tokenizer.decode(trained)
    first = next(i for i, label in enumerate(split.chosen.labels) if label != IGNORE_INDEX)
    assert split.chosen.input_ids[:first] == split.rejected.input_ids[:first]  # the same prompt tokens


def test_truncation_cuts_the_prompt_first_and_keeps_both_responses_comparable(tokenizer):
    prompt = " ".join(WORDS * 3)
    record = {"prompt": prompt, "chosen": " red blue green", "rejected": " " + " ".join(WORDS)}
    full = tokenize_pair(record, SPEC, tokenizer, 1000)
    response_lengths = [sum(1 for x in s.labels if x != IGNORE_INDEX) for s in (full.chosen, full.rejected)]
    prompt_length = len(full.chosen) - response_lengths[0]
    limit = prompt_length // 2 + max(response_lengths) + 4  # the prompt must lose tokens, the responses none
    cut = tokenize_pair(record, SPEC, tokenizer, limit)
    assert cut.truncated and max(len(cut.chosen), len(cut.rejected)) == limit
    for long, short in ((full.chosen, cut.chosen), (full.rejected, cut.rejected)):
        kept = len(short) - (len(long) - prompt_length)
        assert short.input_ids[0] == tokenizer.bos_token_id  # BOS stays
        assert short.input_ids[1:kept] == long.input_ids[prompt_length - kept + 1:prompt_length]  # its end
        assert short.input_ids[kept:] == long.input_ids[prompt_length:]  # the response whole
    tiny = tokenize_pair(record, SPEC, tokenizer, 24)  # not even the longer response fits: half the room each
    assert len(tiny.rejected) == 24 and tiny.rejected.input_ids[:12] == tiny.chosen.input_ids[:12]
    assert sum(1 for x in tiny.rejected.labels if x != IGNORE_INDEX) == 12


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a"}, "preference field 'rejected' is missing"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' is int; expected text or a list"),
    ({"chosen": "a", "rejected": "b"}, "'prompt' is missing"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "must be one assistant turn"),
])
def test_malformed_pairs_are_refused_with_the_reason(tokenizer, record, message):
    with pytest.raises(RecordError, match=message):
        tokenize_pair(record, SPEC, tokenizer, 64)


def test_a_malformed_record_names_its_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    proc = run_ft("train", *tiny_run_args(tmp_path / "out", "--set", "task=preference", "--set",
                                          f"data.train=[{{path: {data}, format: preference}}]",
                                          "--set", "data.eval=null", "--set", "evaluation.every=0"), check=False,
                  trains=False)
    assert proc.returncode != 0
    assert f"{data}:2: preference field 'rejected' is missing" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["data.packing=true"], "data.packing: does not apply to task preference"),
    (["data.eval=[{path: e.jsonl, format: chat}]", "evaluation.every=2"],
     "preference.loss=dpo reads format preference"),
    (["loss.impl=full"], "every preference log-prob goes through the chunked loss"),
])
def test_what_preference_does_not_cover_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["task=preference", "data.train=[{path: x.jsonl, format: preference}]",
                           "data.eval=null", "evaluation.every=0", *overrides])


# ------------------------------------------------------------------------------------------ the objectives
def paper_loss(name: str, pc, pr, rc, rr, lc, lr, beta=0.3, gamma=0.4, lam=0.7):
    """Each objective straight from its paper, per pair, from summed log-probs and response lengths."""
    if name == "dpo":
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    if name == "ipo":
        return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.clamp(1 - beta * ((pc - rc) - (pr - rr)), min=0)
    if name == "simpo":
        return -F.logsigmoid(beta / lc * pc - beta / lr * pr - gamma)
    odds_c, odds_r = torch.exp(pc / lc) / (1 - torch.exp(pc / lc)), torch.exp(pr / lr) / (1 - torch.exp(pr / lr))
    return -pc / lc - lam * F.logsigmoid(torch.log(odds_c / odds_r))


def policy_and_reference(cfg, model_dir, method: str, seed: int):
    """The tiny model of `cfg` moved away from its base (LoRA's B drawn at random, or full weights perturbed) and
    the reference the objective reads: None for LoRA (the adapter disabled), a frozen base copy for full."""
    model = load_model(cfg, model_dir, torch.device("cpu"))
    reference = None
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    if method == "full":
        reference = load_model(load_config(None, ["adapter.method=full", "model.attn_implementation=sdpa"]),
                               model_dir, torch.device("cpu")).requires_grad_(False).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    return model, reference


def whole_logit_logps(model, inputs):
    """Summed response log-probs per row from the model's whole logits."""
    logits = model(**inputs.forward_kwargs()).logits.float()
    labels = inputs.labels[:, 1:]
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    token = logps.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token * (labels != IGNORE_INDEX)).sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1).float()


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_each_objective_equals_its_papers_formula(builtin_model_dir, tokenizer, name, method):
    """On a fixed batch of 3 pairs (text and chat): the loss and the gradient of every trained parameter equal the
    formula applied to log-probs from the whole logits; the reference is the adapter disabled (LoRA) or a frozen
    copy (full)."""
    cfg = load_config(None, ["task=preference", "data.train=[{path: x.jsonl, format: preference}]",
                             "data.eval=null", "evaluation.every=0", f"adapter.method={method}", "adapter.dropout=0",
                             "model.attn_implementation=sdpa", f"preference.loss={name}", "preference.beta=0.3",
                             "preference.simpo_gamma=0.4", "preference.orpo_lambda=0.7"])
    model, reference = policy_and_reference(cfg, builtin_model_dir, method, seed=1)
    records = [{"prompt": "Repeat: red cat", "chosen": " red cat", "rejected": " blue dog"},
               {"prompt": [{"role": "user", "content": "Repeat: sun"}], "chosen": "sun", "rejected": "moon tree"},
               {"prompt": "Say: stone river bird", "chosen": " stone river bird", "rejected": " fish"}]
    batch = collate_pairs([tokenize_pair(r, SPEC, tokenizer, 64) for r in records], tokenizer.pad_token_id, [])
    inputs = model_inputs(batch, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]

    objective = PreferenceLoss(cfg.preference, lambda m: m, 8, LogitTransform.of(model.config), reference)
    result = objective(model, inputs, normaliser=5)  # 3 of a step's 5 pairs
    got = torch.autograd.grad(result.loss, trained)

    sums, lengths = whole_logit_logps(model, inputs)
    with torch.no_grad():
        if reference is not None:
            ref, _ = whole_logit_logps(reference, inputs)
        else:
            with model.disable_adapter():
                ref, _ = whole_logit_logps(model, inputs)
    want_loss = paper_loss(name, sums[:3], sums[3:], ref[:3], ref[3:], lengths[:3], lengths[3:]).sum() / 5
    want = torch.autograd.grad(want_loss, trained)
    torch.testing.assert_close(result.loss.detach(), want_loss.detach(), rtol=1e-5, atol=0)
    for w, g in zip(want, got):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-9
    terms = result.terms
    torch.testing.assert_close(terms["logps_chosen"], sums[:3].detach().sum() / 5, rtol=1e-5, atol=1e-6)
    assert 0 <= terms["reward_accuracy"] <= 3 / 5


# ---------------------------------------------------------------------------------------------------- runs
def preference_args(out, data, *extra: str, eval_data=None) -> list[str]:
    evaluation = (("--set", f"data.eval=[{{path: {eval_data}, format: preference}}]") if eval_data else
                  ("--set", "data.eval=null", "--set", "evaluation.every=0"))
    return tiny_run_args(out, "--set", "task=preference", "--set", f"data.train=[{{path: {data}, format: preference}}]",
                         *evaluation, *extra)


@pytest.mark.trains
def test_dpo_learns_the_repeat_task(tmp_path):
    """Reward accuracy on 50 held-out pairs (data.eval) >= 0.9 after 40 steps; 0 before (the adapter starts as
    the reference, so every reward is 0 and no pair is won)."""
    data = repeat_task(tmp_path / "pairs.jsonl", 400, seed=0)
    held_out = repeat_task(tmp_path / "held_out.jsonl", 50, seed=99)
    out = tmp_path / "dpo"
    run_ft("train", *tiny_run_args(out, "--set", "task=preference", "--set",
                                   f"data.train=[{{path: {data}, format: preference}}]", "--set",
                                   f"data.eval=[{{path: {held_out}, format: preference}}]", "--set",
                                   "evaluation.every=20", "--set", "train.max_steps=40", "--set", "optimizer.lr=2e-3",
                                   "--set", "train.micro_batch_size=8", "--set", "checkpoint.every_steps=0",
                                   "--set", "preference.beta=0.5"))
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "lr" in r]
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert len(steps) == 40 and [e["step"] for e in evals] == [20, 40] and evals[-1]["eval_pairs"] == 50
    assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_reward_margin"] > 0 and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["reward_accuracy"] == 0.0  # the adapter starts as the reference: every reward 0, no pair won
    # The result exports like any LoRA run: merged, verified against base + adapter.
    proc = ft_in_process("export", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged"))
    assert "verification: passed" in proc.stdout


@pytest.mark.parametrize("settings", [
    ("adapter.method=full", "preference.loss=dpo", "distributed.zero_stage=2"),
    ("adapter.method=freeze", "adapter.top_layers=1", "preference.loss=ipo", "distributed.zero_stage=0"),
    ("adapter.method=full", "preference.loss=simpo", "preference.beta=2.0", "distributed.zero_stage=3"),
], ids=["full-dpo-reference_copy-zero2", "freeze-ipo-zero0", "full-simpo-zero3"])
@pytest.mark.trains
def test_full_and_freeze_preference_runs_train(tmp_path, settings):
    """The weights themselves train: DPO/IPO read a frozen reference copy; SimPO needs none (so ZeRO-3 full)."""
    data = repeat_task(tmp_path / "pairs.jsonl", 100, seed=3)
    out = tmp_path / "run"
    proc = run_ft("train", *preference_args(out, data, "--set", "train.max_steps=6", "--set", "optimizer.lr=5e-4",
                                            "--set", "checkpoint.every_steps=0",
                                            *(w for s in settings for w in ("--set", s))))
    loss = settings[1 if settings[0] != "adapter.method=freeze" else 2].split("=")[1]
    assert f"loss {loss} (beta" in proc.stdout
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    assert len(steps) == 6 and all(r["grad_norm"] is None or r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["reward_margin"] != steps[0]["reward_margin"]
    assert (out / "final" / "model.safetensors").is_file() or list((out / "final").glob("*.safetensors"))


def zero3_qlora_resume_and_accumulation(tmp_path, args_of, data, held_out) -> tuple[list, list]:
    """2-rank ZeRO-3 QLoRA runs of `args_of(out, data, ...)`: straight, and stopped at step 4 then resumed (the
    losses must be equal bit for bit); and 1 rank x 2 accumulated micro batches. Returns the metrics rows of the
    straight 2-rank run and of the 1-rank run."""
    common = ("--set", "distributed.zero_stage=3", "--set", "adapter.method=qlora", "--set", "model.dtype=float32")
    straight, resumed, one = tmp_path / "straight", tmp_path / "resumed", tmp_path / "one_rank"
    run_ft("launch", *args_of(straight, data, *common, eval_data=held_out), "--nproc", "2")
    run_ft("launch", *args_of(resumed, data, *common, "--set", "train.stop_at_step=4", eval_data=held_out),
           "--nproc", "2")
    second = run_ft("launch", *args_of(resumed, data, *common, eval_data=held_out), "--nproc", "2")
    assert "resumed from" in second.stdout
    losses = {name: [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
              for name, out in (("straight", straight), ("resumed", resumed))}
    assert len(losses["straight"]) == 8 and losses["resumed"] == losses["straight"]
    run_ft("train", *args_of(one, data, *common, "--set", "train.grad_accum_steps=2", eval_data=held_out))
    return read_jsonl(straight / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")


@pytest.mark.multiproc
@pytest.mark.trains
def test_zero3_qlora_dpo_accumulates_like_two_ranks_and_resumes_exactly(tmp_path):
    """2 ranks x 1 micro batch = 1 rank x 2 accumulated (the mean over the step's pairs); a ZeRO-3 QLoRA run
    stopped at step 4 and resumed gives the uninterrupted run's losses bit for bit; the eval over 9 held-out pairs
    (rank 0 gets 5, rank 1 gets 4 and a filler batch) equals the 1-process eval."""
    data = repeat_task(tmp_path / "pairs.jsonl", 200, seed=1)
    held_out = repeat_task(tmp_path / "held_out.jsonl", 9, seed=2)
    straight_rows, accumulated = zero3_qlora_resume_and_accumulation(tmp_path, preference_args, data, held_out)
    for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen"):
        assert [r[key] for r in accumulated if "lr" in r] == pytest.approx(
            [r[key] for r in straight_rows if "lr" in r], rel=1e-4, abs=1e-6), key
    evals = {name: [r for r in rows if "eval_loss" in r] for name, rows in (("one", accumulated),
                                                                             ("two", straight_rows))}
    assert [e["eval_pairs"] for e in evals["two"]] == [9, 9]
    for want, got in zip(evals["one"], evals["two"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_ft_data_inspect_shows_each_pair_with_its_masks(tmp_path):
    data = repeat_task(tmp_path / "pairs.jsonl", 5, seed=2, chat=True)
    proc = ft_in_process("data", "inspect", "examples/chat-demo.yaml", "--set", "task=preference", "--set",
                         f"data.train=[{{path: {data}, format: preference}}]", "--set", "data.eval=null",
                         "--set", "evaluation.every=0", "--show", "1")
    out = proc.stdout
    assert f"{data}:" in out and " (chosen)" in out and " (rejected)" in out
    chosen, rejected = out.split(" (chosen)")[1].split(" (rejected)")
    # The same prompt, masked; each response trained (between « »).
    assert chosen.count("«") == 1 and rejected.split("statistics")[0].count("«") == 1
    assert chosen.split("«")[0].split("Repeat:")[1].strip() == rejected.split("«")[0].split("Repeat:")[1].strip()


def test_ft_plan_counts_both_responses_and_the_reference_copy():
    from ftcore.tools.plan import build_facts, make_plan

    base = ["task=preference", "data.train=[{path: x.jsonl, format: preference}]", "data.eval=null",
            "evaluation.every=0", "distributed.zero_stage=2"]
    rows = {}
    for name, extra in (("sft", ["task=causal_lm", "data.train=[{path: x.jsonl, format: chat}]"]),
                        ("dpo", ["preference.loss=dpo"]), ("simpo", ["preference.loss=simpo"])):
        cfg = load_config("examples/llama-2-7b-lora.yaml", [*base, "adapter.method=full", *extra])
        plan = make_plan(cfg, build_facts(cfg, cfg.model.name_or_path), 8, 1, None)
        rows[name] = next(r for r in plan.rows if (r.stage, r.offload) == (2, "none"))
    params = 6_738_415_616
    assert rows["dpo"].weights - rows["simpo"].weights == params * 2  # the bf16 reference copy, dpo only
    assert rows["simpo"].activations_full > 1.9 * rows["sft"].activations_full  # chosen + rejected rows
