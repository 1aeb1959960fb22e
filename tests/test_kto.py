"""preference.loss=kto on format kto data: records tokenized and truncated as documented, the mismatched rows of
the reference point built from other samples' completions; the loss and gradients equal the paper's formula on
the model's whole logits; runs learn, accumulate like data parallelism and resume exactly.

Tolerance of the formula test: fp32, as tests/test_preference.py (losses rtol 1e-5, every gradient tensor within
1e-5 of its largest entry): the chunked log-probs sum in another order than log_softmax over the whole logits."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from ftcore.config import ConfigError, FieldNames, load_config
from ftcore.data.formats import IGNORE_INDEX, RecordError, RecordSpec
from ftcore.data.preference import tokenize_kto
from ftcore.losses.chunked import LogitTransform
from ftcore.losses.preference import KTOLoss
from ftcore.tasks.kto import collate_kto
from ftcore.train.sequence_parallel import model_inputs
from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_run_args
from tests.test_preference import (
    WORDS,
    policy_and_reference,
    whole_logit_logps,
    zero3_qlora_resume_and_accumulation,
)

SPEC = RecordSpec("kto", "completion", FieldNames())


def kto_task(path, count: int, seed: int):
    """'Repeat: w1 w2 w3' with an answer that repeats the words (desirable) or gives others (undesirable), half
    each, unpaired (each prompt appears once)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            words = rng.sample(WORDS, 3)
            good = i % 2 == 0
            answer = words if good else rng.sample([w for w in WORDS if w not in words], 3)
            f.write(json.dumps({"prompt": "Repeat: " + " ".join(words) + "\nAnswer:",
                                "completion": " " + " ".join(answer), "label": good}) + "\n")
    return path


def rotated(samples: list) -> list:
    """Each sample's partner in a list in stream order: the next one (the last's is the first)."""
    return samples[1:] + samples[:1]


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ data
def test_a_kto_record_trains_only_its_completion_in_text_and_chat_form(tokenizer):
    text = tokenize_kto({"prompt": "Repeat: red cat", "completion": " red cat", "label": True}, SPEC, tokenizer, 64)
    assert text.desirable and text.sample.input_ids[0] == tokenizer.bos_token_id
    assert trained_text(tokenizer, text.sample.input_ids, text.sample.labels) == "red cat</s>"
    assert text.sample.input_ids == text.prompt + text.completion_ids
    chat = tokenize_kto({"prompt": [{"role": "user", "content": "Repeat: sun"}],
                         "completion": [{"role": "assistant", "content": "moon"}], "label": False},
                        SPEC, tokenizer, 64)
    whole = tokenize_kto({"completion": [{"role": "user", "content": "Repeat: sun"},
                                         {"role": "assistant", "content": "moon"}], "label": False},
                         SPEC, tokenizer, 64)
    assert not chat.desirable and chat.sample == whole.sample  # a conversation's last turn is the completion
    assert trained_text(tokenizer, chat.sample.input_ids, chat.sample.labels).startswith("moon")


def test_mismatched_rows_join_each_prompt_with_the_next_samples_completion(tokenizer):
    records = [{"prompt": f"Repeat: {w}", "completion": f" {w}", "label": i % 2 == 0}
               for i, w in enumerate(["red", "blue green", "cat dog sun"])]
    samples = [tokenize_kto(r, SPEC, tokenizer, 64) for r in records]
    batch = collate_kto(samples, rotated(samples), tokenizer.pad_token_id, [], 64, tokenizer.bos_token_id)
    assert batch.examples == 3 and batch.extra.desirable.tolist() == [True, False, True]
    rows = batch.extra.mismatched
    for row, (mine, theirs) in enumerate(zip(samples, rotated(samples))):
        ids = rows.input_ids[row][rows.attention_mask[row].bool()].tolist()
        assert ids == mine.prompt + theirs.completion_ids
        assert trained_text(tokenizer, ids, rows.labels[row].tolist()) == \
            trained_text(tokenizer, theirs.sample.input_ids, theirs.sample.labels)


def test_truncation_cuts_the_prompt_first(tokenizer):
    record = {"prompt": "Repeat: " + " ".join(WORDS * 3), "completion": " red cat dog", "label": True}
    whole = tokenize_kto(record, SPEC, tokenizer, 512)
    cut = tokenize_kto(record, SPEC, tokenizer, 24)
    assert cut.truncated and len(cut.sample) == 24 and cut.sample.input_ids[0] == tokenizer.bos_token_id
    assert cut.sample.input_ids[-len(whole.completion_ids):] == whole.completion_ids  # the completion whole
    assert cut.prompt == cut.sample.input_ids[:24 - len(whole.completion_ids)]


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "completion": "a"}, "kto field 'label' is missing; expected true"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "kto field 'label' is 'yes'"),
    ({"prompt": "p", "label": True}, "kto field 'completion' is missing"),
    ({"completion": "a", "label": True}, "kto field 'prompt' is missing"),
    ({"completion": [{"role": "assistant", "content": "a"}], "label": True}, "has no turn before its last"),
])
def test_malformed_kto_records_are_refused_with_the_reason(tokenizer, record, message):
    with pytest.raises(RecordError, match=message):
        tokenize_kto(record, SPEC, tokenizer, 64)


@pytest.mark.parametrize("overrides,message", [
    (["data.train=[{path: x.jsonl, format: preference}]"], "preference.loss=kto reads format kto"),
    (["preference.loss=dpo"], "preference.loss=dpo reads format preference"),
    (["task=causal_lm"], "format kto needs task: preference and preference.loss: kto"),
])
def test_kto_configs_that_cannot_work_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["task=preference", "preference.loss=kto", "data.train=[{path: x.jsonl, format: kto}]",
                           "data.eval=null", "evaluation.every=0", "train.micro_batch_size=2", *overrides])


# ------------------------------------------------------------------------------------------ the objective
def paper_kto(policy, reference, ratios_mismatched, desirable, beta, w_d, w_u):
    """KTO per sample straight from arXiv 2402.01306 (eq. 8, with TRL's estimate of z_ref)."""
    z = torch.clamp(ratios_mismatched.mean(), min=0).detach()
    r = policy - reference
    return torch.where(desirable, w_d * (1 - torch.sigmoid(beta * (r - z))),
                       w_u * (1 - torch.sigmoid(beta * (z - r)))), z


@pytest.mark.parametrize("other_rank", [None, 4.0], ids=["z_clamped", "z_positive"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_kto_equals_its_papers_formula(builtin_model_dir, tokenizer, method, other_rank):
    """Two micro batches of one step (5 samples, text and chat): the reference point from both batches'
    mismatched rows (and, for z_positive, a second rank's 3 rows of log-ratio 4 through the all-reduce), then the
    loss and the gradient of every trained parameter of each micro batch equal the formula applied to log-probs
    from the whole logits."""
    cfg = load_config(None, ["task=preference", "preference.loss=kto", "data.train=[{path: x.jsonl, format: kto}]",
                             "data.eval=null", "evaluation.every=0", "train.micro_batch_size=2",
                             f"adapter.method={method}", "adapter.dropout=0", "model.attn_implementation=sdpa",
                             "preference.beta=0.7", "preference.kto_desirable_weight=1.3",
                             "preference.kto_undesirable_weight=0.6"])
    model, reference = policy_and_reference(cfg, builtin_model_dir, method, seed=2)
    records = [{"prompt": "Repeat: red cat", "completion": " red cat", "label": True},
               {"prompt": [{"role": "user", "content": "Repeat: sun"}], "completion": "moon tree", "label": False},
               {"prompt": "Say: stone river bird", "completion": " stone river bird", "label": True},
               {"prompt": "Repeat: fish", "completion": " dog", "label": False},
               {"prompt": "Repeat: green blue", "completion": " green blue", "label": True}]
    samples = [tokenize_kto(r, SPEC, tokenizer, 64) for r in records]
    micro = [samples[:3], samples[3:]]
    inputs = [collate_kto(m, rotated(m), tokenizer.pad_token_id, [], 64, tokenizer.bos_token_id)
              for m in micro]
    inputs = [model_inputs(batch, torch.device("cpu")) for batch in inputs]
    trained = [p for p in model.parameters() if p.requires_grad]
    p = cfg.preference

    def all_reduce(values):  # this rank's [sum of log-ratios, rows] + the other rank's
        return values if other_rank is None else [values[0] + 3 * other_rank, values[1] + 3]

    objective = KTOLoss(p, lambda m: m, 8, LogitTransform.of(model.config), reference, all_reduce)
    objective.start_step(model, inputs)

    def reference_logps(batch_inputs):
        with torch.no_grad():
            if reference is not None:
                return whole_logit_logps(reference, batch_inputs)[0]
            with model.disable_adapter():
                return whole_logit_logps(model, batch_inputs)[0]

    with torch.no_grad():
        mismatched = [i.extra.mismatched for i in inputs]
        ratios = torch.cat([whole_logit_logps(model, m)[0] - reference_logps(m) for m in mismatched])
        if other_rank is not None:
            ratios = torch.cat([ratios, torch.full((3,), other_rank)])
    for batch_inputs in inputs:
        plain = batch_inputs  # whole_logit_logps reads the rows only
        result = objective(model, batch_inputs, normaliser=5)
        got = torch.autograd.grad(result.loss, trained)
        losses, z = paper_kto(whole_logit_logps(model, plain)[0], reference_logps(plain), ratios,
                              batch_inputs.extra.desirable, 0.7, 1.3, 0.6)
        want_loss = losses.sum() / 5
        want = torch.autograd.grad(want_loss, trained)
        assert objective.reference_point == pytest.approx(float(z), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(result.loss.detach(), want_loss.detach(), rtol=1e-5, atol=0)
        for w, g in zip(want, got):
            assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-9
    assert (objective.reference_point > 0) == (other_rank is not None)


# ---------------------------------------------------------------------------------------------------- runs
def kto_args(out, data, *extra: str, eval_data=None) -> list[str]:
    evaluation = (("--set", f"data.eval=[{{path: {eval_data}, format: kto}}]") if eval_data else
                  ("--set", "data.eval=null", "--set", "evaluation.every=0"))
    return tiny_run_args(out, "--set", "task=preference", "--set", "preference.loss=kto", "--set",
                         f"data.train=[{{path: {data}, format: kto}}]", "--set", "train.micro_batch_size=2",
                         *evaluation, *extra)


@pytest.mark.multiproc
@pytest.mark.trains
def test_zero3_qlora_kto_accumulates_like_two_ranks_and_resumes_exactly(tmp_path):
    """The reference point is the step's and its mismatched rows follow stream order: 2 ranks x 1 micro batch =
    1 rank x 2 accumulated (loss, kl, rewards);
    a ZeRO-3 QLoRA run stopped at step 4 and resumed gives the uninterrupted run's losses bit for bit; the eval over
    9 held-out samples (its mismatched rows pair each with the next of the whole set) equals the 1-process eval."""
    data = kto_task(tmp_path / "kto.jsonl", 200, seed=1)
    held_out = kto_task(tmp_path / "held_out.jsonl", 9, seed=2)
    straight_rows, one_rows = zero3_qlora_resume_and_accumulation(tmp_path, kto_args, data, held_out)
    two, accumulated = ([r for r in rows if "lr" in r] for rows in (straight_rows, one_rows))
    assert any(r["kl"] > 0 for r in two)  # the reference point moved off its clamp at some step
    for key in ("loss", "kl", "reward_accuracy", "rewards_chosen", "logps_rejected"):
        # A step without a desirable (undesirable) sample has no mean for that side in either run.
        assert [key in r for r in accumulated] == [key in r for r in two], key
        assert [r[key] for r in accumulated if key in r] == pytest.approx([r[key] for r in two if key in r],
                                                                         rel=1e-4, abs=1e-6), key
    evals = {name: [r for r in rows if "eval_loss" in r] for name, rows in (("one", one_rows),
                                                                          ("two", straight_rows))}
    assert [e["eval_samples"] for e in evals["two"]] == [9, 9]
    for want, got in zip(evals["one"], evals["two"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.trains
def test_kto_learns_the_repeat_task(tmp_path):
    """Unpaired answers, half desirable: after 90 steps >= 0.9 of 100 held-out samples sit on their label's side
    of the reference point (none at step 1: every reward is 0 = z); the desirable rewards end above the
    undesirable."""
    data = kto_task(tmp_path / "kto.jsonl", 800, seed=0)
    held_out = kto_task(tmp_path / "held_out.jsonl", 100, seed=99)
    out = tmp_path / "kto"
    run_ft("train", *kto_args(out, data, "--set", "evaluation.every=45", "--set", "train.max_steps=90", "--set",
                              "optimizer.lr=2e-3", "--set", "train.micro_batch_size=8", "--set",
                              "checkpoint.every_steps=0", "--set", "preference.beta=2.0", eval_data=held_out))
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "lr" in r]
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert len(steps) == 90 and [e["step"] for e in evals] == [45, 90] and evals[-1]["eval_samples"] == 100
    assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_reward_margin"] > 0
    assert steps[0]["rewards_chosen"] == 0.0 == steps[0]["kl"] == steps[0]["reward_accuracy"]


@pytest.mark.multiproc
@pytest.mark.trains
def test_full_kto_under_zero3_reads_a_partitioned_reference(tmp_path):
    """Full fine-tuning under ZeRO-3: the frozen reference is partitioned like the model (each of 2 ranks holds
    half of it) and the run's losses equal ZeRO-2's with a whole reference copy (rel 1e-5)."""
    data = kto_task(tmp_path / "kto.jsonl", 100, seed=3)
    runs = {}
    for stage in (3, 2):
        out = tmp_path / f"zero{stage}"
        proc = run_ft("launch", *kto_args(out, data, "--set", "adapter.method=full", "--set", "model.dtype=float32",
                                          "--set", f"distributed.zero_stage={stage}", "--set", "train.max_steps=5",
                                          "--set", "checkpoint.every_steps=0", "--set", "optimizer.lr=5e-4"),
                      "--nproc", "2")
        held, total = (int(n.replace(",", "")) for n in re.search(
            r"reference: a frozen copy of the base model, ([\d,]+) of its ([\d,]+) parameters", proc.stdout).groups())
        runs[stage] = ([r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r], held / total)
    assert runs[3][1] == pytest.approx(0.5, abs=0.01) and runs[2][1] == 1.0
    assert runs[3][0] == pytest.approx(runs[2][0], rel=1e-5) and runs[3][0][-1] != runs[3][0][0]


def test_ft_data_inspect_marks_each_sample_desirable_or_not(tmp_path):
    data = kto_task(tmp_path / "kto.jsonl", 4, seed=2)
    proc = ft_in_process("data", "inspect", "examples/chat-demo.yaml", "--set", "task=preference", "--set",
                         "preference.loss=kto", "--set", f"data.train=[{{path: {data}, format: kto}}]", "--set",
                         "data.eval=null", "--set", "evaluation.every=0", "--set", "train.micro_batch_size=2",
                         "--set", "data.shuffle=false", "--show", "2")
    assert f"{data}:1 (desirable)" in proc.stdout and f"{data}:2 (undesirable)" in proc.stdout


def test_ft_plan_counts_one_row_per_kto_sample_and_a_partitioned_reference():
    from ftcore.tools.plan import build_facts, make_plan

    base = ["task=preference", "data.eval=null", "evaluation.every=0", "adapter.method=full",
            "train.micro_batch_size=2"]
    rows = {}
    for name, extra in (("dpo", ["data.train=[{path: x.jsonl, format: preference}]"]),
                        ("kto", ["preference.loss=kto", "data.train=[{path: x.jsonl, format: kto}]"])):
        cfg = load_config("examples/llama-2-7b-lora.yaml", [*base, *extra])
        plan = make_plan(cfg, build_facts(cfg, cfg.model.name_or_path), 8, 1, None)
        rows[name] = {r.stage: r for r in plan.rows if r.offload == "none"}
    assert rows["kto"][2].activations_full < 0.55 * rows["dpo"][2].activations_full  # one row, not two
    params = 6_738_415_616
    simpo = load_config("examples/llama-2-7b-lora.yaml", [*base, "preference.loss=simpo",
                                                         "data.train=[{path: x.jsonl, format: preference}]"])
    no_reference = {r.stage: r for r in make_plan(simpo, build_facts(simpo, simpo.model.name_or_path), 8, 1,
                                                   None).rows if r.offload == "none"}
    assert rows["kto"][3].supported  # full + a reference under ZeRO-3: the copy is partitioned, 1/8 per GPU
    assert rows["kto"][3].weights - no_reference[3].weights == pytest.approx(params * 2 / 8)
