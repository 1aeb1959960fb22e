"""Evaluation by generation: the metrics against hand-computed values, prompts rendered as training renders them,
`ft eval` on 1 rank = on 2 ranks = on 2 ZeRO-3 ranks, on an export = on base + adapter, and evaluation.generate's
answers = `ft eval`'s on the run's final/ model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftcore.config import ConfigError, load_config
from ftcore.evaluation.scoring import accuracy, contains, exact_match, mean_scores, rouge_l
from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_run_args


def test_metrics_against_hand_computed_values():
    assert exact_match("  The cat \n sat ", "The cat sat") == 1.0
    assert exact_match("the cat sat", "The cat sat") == 0.0  # case kept
    assert accuracy("Positive.", "positive") == 1.0 and accuracy("positive!", "negative") == 0.0
    assert contains("I think PARIS  is it", "paris is") == 1.0 and contains("Lyon", "Paris") == 0.0
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/6, R = 5/5, F = 2PR / (P + R) = 10/11.
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("Привет, мир!", "привет мир") == 1.0  # Unicode words score (rouge-score's default drops them)
    assert rouge_l("", "anything") == 0.0
    rows = [{"exact_match": 1.0, "rouge_l": 0.5}, {"exact_match": 0.0, "rouge_l": 0.25}]
    assert mean_scores(rows, ["exact_match", "rouge_l"]) == {"exact_match": 0.5, "rouge_l": 0.375}


def test_the_demo_task_is_scored_on_prompts_never_seen_in_training():
    """make demo's before/after score measures the skill (copying three words), not memorised answers."""
    from ftcore.builtin import resolve_data_path

    def triples(name: str) -> list[str]:
        rows = read_jsonl(Path(resolve_data_path(name)))
        assert all(r["messages"][1]["content"] == "Words: " + r["messages"][0]["content"].removeprefix("Repeat: ")
                   for r in rows)
        return [r["messages"][0]["content"] for r in rows]

    train, held_out = triples("builtin:repeat-words"), triples("builtin:repeat-words-eval")
    assert len(train) == 400 and len(held_out) == 50 and not set(train) & set(held_out)
    cfg = load_config("examples/demo-tiny.yaml", [])
    assert [s.path for s in cfg.data.train] == ["builtin:repeat-words"] and cfg.evaluation.generate


def test_the_real_model_demo_task_is_scored_on_sums_never_seen_in_training():
    """make demo (Gemma-3-270M) is scored on held-out sums: no (a, b) of the eval set is trained, in either order,
    and every reference is the right sum."""
    from ftcore.builtin import resolve_data_path

    def sums(name: str) -> list[tuple[int, int]]:
        out = []
        for r in read_jsonl(Path(resolve_data_path(name))):
            a, b = (int(x) for x in r["messages"][0]["content"].removeprefix("What is ").rstrip("?").split(" + "))
            assert r["messages"][1]["content"] == str(a + b)
            out.append((a, b))
        return out

    train, held_out = sums("builtin:add-two-digits"), sums("builtin:add-two-digits-eval")
    assert len(train) == 2000 and len(held_out) == 100
    assert not (set(train) | {(b, a) for a, b in train}) & set(held_out)
    cfg = load_config("examples/demo.yaml", [])
    assert cfg.model.name_or_path == "builtin:gemma-3-270m"
    assert [s.path for s in cfg.data.train] == ["builtin:add-two-digits"] and cfg.evaluation.generate


def test_prompts_are_rendered_as_training_renders_them():
    from transformers import AutoTokenizer

    from ftcore.builtin import resolve_model_path
    from ftcore.config import FieldNames
    from ftcore.data.chat_template import render
    from ftcore.data.formats import RecordSpec, prompt_and_reference

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    spec = RecordSpec("chat", "last_assistant", FieldNames())
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "4."}]
    ids, reference = prompt_and_reference({"messages": turns}, spec, tokenizer)
    assert reference == "4."
    assert ids == tokenizer(render(tokenizer, turns[:3], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    spec = RecordSpec("prompt_completion", "completion", FieldNames())
    ids, reference = prompt_and_reference({"prompt": "Q: 1+1\nA:", "completion": " 2"}, spec, tokenizer)
    assert reference == " 2" and ids[0] == tokenizer.bos_token_id


def test_eval_generate_config_is_checked():
    with pytest.raises(ConfigError, match="evaluation.generate: needs data.eval"):
        load_config(None, ["evaluation.generate=[exact_match]", "data.eval=null"])
    with pytest.raises(ConfigError, match="evaluation.generate"):
        load_config(None, ["evaluation.generate=[bleu]"])
    assert load_config("examples/chat-demo.yaml", ["evaluation.generate=rouge_l"]).evaluation.generate == ["rouge_l"]
    with pytest.raises(ConfigError, match="evaluation.rewards: .*tests.reward_fns has no function gone") as caught:
        load_config("examples/chat-demo.yaml", ["evaluation.rewards=[{function: tests.reward_fns:gone}]"])
    assert caught.value.field == "evaluation.rewards"
    with pytest.raises(ConfigError, match="evaluation.rewards: scores generated answers of task causal_lm"):
        load_config(None, ["task=classification", "data.train=[{path: x.jsonl, format: classification}]",
                           "evaluation.rewards=[{function: exact_answer}]"])


def eval_rows(out: Path) -> tuple[list[dict], dict]:
    return read_jsonl(out / "predictions.jsonl"), json.loads((out / "summary.json").read_text())


def same_answers(a: list[dict], b: list[dict]) -> bool:
    keys = ("index", "where", "reference", "prediction")
    return [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]


LETTERS = "abcdefghijklmnopqrstuvwxyz"
EVAL = ("--data", "builtin:chat-demo-eval", "--max-new-tokens", "12", "--metric", "exact_match", "--metric",
        "rouge_l", "--batch-size", "4", "--reward", 'char_share {"chars": "%s"}' % LETTERS)


@pytest.mark.multiproc
def test_eval_on_two_ranks_and_on_two_zero3_ranks_equals_one_rank(tmp_path):
    ft_in_process("eval", "builtin:tiny-llama", *EVAL, "--out", str(tmp_path / "one"))
    run_ft("eval", "builtin:tiny-llama", *EVAL, "--out", str(tmp_path / "two"), "--nproc", "2")
    run_ft("eval", "builtin:tiny-llama", *EVAL, "--out", str(tmp_path / "zero3"), "--nproc", "2", "--zero3")
    one, summary = eval_rows(tmp_path / "one")
    assert len(one) == 40 and summary["world_size"] == 1 and summary["samples"] == 40
    # --reward: each answer scored by the rule in a worker, the mean over the answers in the summary.
    want = [sum(ch in LETTERS for ch in r["prediction"]) / len(r["prediction"]) if r["prediction"] else 0.0
            for r in one]
    assert [r["reward_char_share"] for r in one] == pytest.approx(want)
    assert summary["metrics"]["reward_char_share"] == pytest.approx(sum(want) / len(want))
    for name in ("two", "zero3"):
        rows, other = eval_rows(tmp_path / name)
        assert other["world_size"] == 2 and same_answers(rows, one), name
        assert other["metrics"] == summary["metrics"], name


@pytest.mark.multiproc
def test_a_failing_eval_rank_is_reported_as_a_failing_training_rank_is(tmp_path):
    """`ft eval --nproc 2` runs under the training's supervisor: the first failing rank is named with its reason
    and its log tail, the others are stopped, and nothing is written."""
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                 "content": "yo"}]})
                    + "\n" + json.dumps({"messages": 3}) + "\n")
    proc = run_ft("eval", "builtin:tiny-llama", "--data", str(data), "--out", str(tmp_path / "ev"), "--nproc", "2",
                  check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"\[node0 launcher\] evaluation failed; rank [01] failed first: \S*held_out.jsonl:2: chat "
                     r"field 'messages'", proc.stderr), proc.stderr[-2000:]
    assert "last " in proc.stderr and not (tmp_path / "ev").exists()


@pytest.mark.multiproc
@pytest.mark.trains
def test_training_eval_generate_equals_ft_eval_and_an_export_equals_base_plus_adapter(tmp_path):
    out = tmp_path / "run"
    run_ft("train", *tiny_run_args(out, "--set", "evaluation.generate=[exact_match,rouge_l]",
                                   "--set", "evaluation.max_new_tokens=12", "--set", "data.max_seq_len=256",
                                   "--set", "evaluation.rewards=[{function: char_share, args: {chars: %s}}]" % LETTERS))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_gen_rouge_l" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(r["eval_gen_samples"] == 40 for r in evals)
    during = read_jsonl(out / "eval" / "generate-step000008.jsonl")
    ft_in_process("eval", str(out / "final"), *EVAL, "--out", str(tmp_path / "adapter"))
    adapter, summary = eval_rows(tmp_path / "adapter")
    assert same_answers(adapter, during)
    assert summary["metrics"]["rouge_l"] == pytest.approx(evals[-1]["eval_gen_rouge_l"])
    assert summary["metrics"]["reward_char_share"] == pytest.approx(evals[-1]["eval_gen_reward_char_share"])
    ft_in_process("export", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged"))
    ft_in_process("eval", str(tmp_path / "merged"), *EVAL, "--out", str(tmp_path / "export"))
    assert same_answers(eval_rows(tmp_path / "export")[0], adapter)
    plot = ft_in_process("plot", str(out))
    assert "metrics.png" in plot.stdout
