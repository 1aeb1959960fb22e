"""Task rl (online RL from rule-based rewards): the config is checked before anything starts, a run trains
through the normal path (the policy answers each step's prompts, rewards score them, the GRPO-family loss trains
on them), its completions and losses do not depend on how the step is split over ranks and micro batches, and a
resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcore.builtin import resolve_data_path
from ftcore.checkpoint import step_dir_name
from ftcore.config import ConfigError, load_config
from tests.conftest import read_jsonl, run_ft

RL = ["task=rl", "data.train=[{path: builtin:add-two-digits, format: chat}]",
      "rl.rewards=[{function: tests.reward_fns:letter_share}]"]


@pytest.mark.parametrize("sets, field, message", [
    (["task=rl", "data.train=[{path: x.jsonl, format: chat}]"], "rl.rewards", "task rl needs at least one reward"),
    (RL[:2] + ["rl.rewards=[{function: tests.reward_fns:nothing}]"], "rl.rewards",
     "tests.reward_fns has no function nothing"),
    (RL[:2] + ["rl.rewards=[{function: exactly}]"], "rl.rewards", "'exactly': not a built-in"),
    (["task=rl", "data.train=[{path: x.txt, format: text}]", RL[2]], "data.train.0.format",
     "task rl answers prompts of chat, alpaca, prompt_completion records"),
    (RL + ["data.max_seq_len=64", "rl.max_new_tokens=64"], "rl.max_new_tokens", "leaves no room for the prompt"),
    (RL + ["data.packing=true"], "data.packing", "does not apply to task rl"),
    (RL + ["loss.impl=full"], "loss.impl", "does not apply to task rl"),
    (RL + ["distributed.sequence_parallel=2", "model.attn_implementation=sdpa"], "distributed.sequence_parallel",
     "does not apply to task rl"),
])
def test_the_config_is_checked_with_the_field_named(sets, field, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, sets)
    assert caught.value.field == field


def rl_args(out: Path, *extra: str) -> list[str]:
    """A small GRPO run of the random tiny model: 2 prompts x 4 completions per step, 4 new tokens each, a dense
    reward (the share of lowercase letters), sampling at temperature 0.15 so that the same tokens come back."""
    sets = [*RL, f"output_dir={out}", "model.dtype=float32", "adapter.method=full", "data.max_seq_len=64",
            "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.max_steps=4", "optimizer.lr=1e-2",
            "optimizer.warmup_steps=0", "logging.every=1", "evaluation.every=0", "checkpoint.every_steps=2",
            "rl.num_generations=4", "rl.max_new_tokens=4", "rl.temperature=0.15", "rl.beta=0.05",
            "rl.epsilon_high=0.28", *extra]
    return [w for s in sets for w in ("--set", s)]


def steps(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]


@pytest.mark.trains
def test_the_policy_learns_the_rule_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """8 GRPO steps of the random tiny model raise the share of lowercase letters its answers are rewarded for;
    the step's metrics are there; a run stopped at step 4 and resumed (the rollouts are seeded by step and prompt,
    nothing else) equals the uninterrupted one bit for bit: rewards, losses and the final weights."""
    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = rl_args(whole, "train.max_steps=8", "checkpoint.every_steps=4")
    run_ft("train", *args)
    rows = steps(whole)
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 0.1, [round(r["reward"], 3) for r in rows]
    for key in ("reward_std", "reward_letter_share", "reward_at_max", "completion_length", "truncated",
                "clip_ratio", "kl", "equal_reward_groups", "reward_timeouts", "generation_s",
                "generation_tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["reward"] == rows[0]["reward_letter_share"] and rows[0]["completion_length"] <= 4
    assert rows[0]["completion_length"] <= rows[0]["completion_length_max"] <= 4

    run_ft("train", *rl_args(resumed, "train.max_steps=8", "checkpoint.every_steps=4", "train.stop_at_step=4"))
    second = run_ft("train", *rl_args(resumed, "train.max_steps=8", "checkpoint.every_steps=4"))
    assert "resumed from" in second.stdout
    for key in ("reward", "loss", "kl", "clip_ratio"):
        assert [r[key] for r in steps(resumed)] == [r[key] for r in rows], key
    x, y = (load_file(out / "final" / "model.safetensors") for out in (whole, resumed))
    assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


@pytest.mark.trains
def test_a_run_killed_between_two_updates_of_one_rollout_batch_resumes_bit_for_bit(tmp_path):
    """rl.num_iterations 2: each rollout batch trains two steps, the second with the importance ratio to the
    policy that sampled it. A run killed (-9) after step 2, whose newest checkpoint (step 1) lies between the two
    updates of the first rollout batch, resumes from it with the kept rollout batch and ends bit for bit where an
    uninterrupted run ends: losses, rewards, clip ratios and weights. The kill comes from the eval at step 2 (a
    record of data.eval names the marker file), so the moment is chosen by data, not by timing."""
    from safetensors.torch import load_file

    marker = tmp_path / "kill-now"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} + {a}?"},
                                                          {"role": "assistant", "content": str(2 * a)}],
                                             "kill_marker": str(marker)}) + "\n" for a in range(2)))

    def args(out: Path) -> list[str]:
        return rl_args(out, "rl.num_iterations=2", "train.max_steps=4", "checkpoint.every_steps=1",
                       "checkpoint.keep_last=4", "evaluation.every=2",
                       f"data.eval=[{{path: {eval_file}, format: chat}}]",
                       "rl.rewards=[{function: tests.reward_fns:letter_share_or_kill}]")

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_ft("train", *args(whole))
    marker.touch()
    first = run_ft("train", *args(killed), check=False)
    assert first.returncode != 0 and not marker.exists(), first.stdout[-2000:]
    saved = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    assert saved == [step_dir_name(1)], saved  # (the eval at step 2 comes before its checkpoint)
    assert [p.name for p in (killed / "checkpoints" / step_dir_name(1)).glob("task_state_rank*.pt")] == [
        "task_state_rank0.pt"]
    second = run_ft("train", *args(killed))
    assert f"{step_dir_name(1)} at step 1" in second.stdout, second.stdout[-2000:]
    a = {r["step"]: r for r in steps(whole)}
    b = {r["step"]: r for r in steps(killed)}  # (step 2 twice: the killed attempt's and the resumed one's)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "reward", "clip_ratio", "kl"):
            assert a[step][key] == b[step][key], (step, key)
    assert a[1]["generation_s"] > 0 and a[2]["generation_s"] == 0 and a[2]["reward"] == a[1]["reward"]
    x, y = (load_file(out / "final" / "model.safetensors") for out in (whole, killed))
    assert all(x[k].equal(y[k]) for k in x)


@pytest.mark.trains
def test_dynamic_sampling_replaces_groups_without_signal(tmp_path):
    """rl.dynamic_sampling_draws: the rewards of a prompt with an even answer are all equal (0.5); those groups are
    dropped and more prompts drawn, so every trained group has signal; the run is deterministic (a rerun resumed
    mid-way equals it)."""
    def args(out: Path, *extra: str) -> list[str]:
        return rl_args(out, "rl.dynamic_sampling_draws=6", "train.max_steps=3", "checkpoint.every_steps=1",
                       "data.audit=true", "rl.rewards=[{function: tests.reward_fns:letter_share_on_odd_answers}]",
                       *extra)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_ft("train", *args(whole))
    rows = steps(whole)
    assert all(r["unresampled_groups"] == 0 for r in rows), rows
    assert sum(r["resampled_prompts"] for r in rows) > 0 and sum(r["equal_reward_groups"] for r in rows) > 0
    records = [json.loads(line) for line in open(resolve_data_path("builtin:add-two-digits"))]
    trained = [s for r in read_jsonl(whole / "audit" / "rank0.jsonl") for s in r.get("samples", [])]
    assert trained and all(int(records[int(s.split(":")[-1].split("#")[0]) - 1]["messages"][1]["content"]) % 2
                           for s in trained), trained
    run_ft("train", *args(resumed, "train.stop_at_step=2"))
    run_ft("train", *args(resumed))
    assert [r["loss"] for r in steps(resumed)] == [r["loss"] for r in rows]


@pytest.mark.multiproc
@pytest.mark.trains
def test_two_ranks_train_what_one_rank_accumulating_two_micro_batches_trains(tmp_path):
    """The same 2 prompts per step on 1 rank (2 micro batches of 1) and on 2 ranks (1 each): the same completions
    (sampling is seeded per completion), the same advantages (over the whole step) and the same loss (normalised
    by the whole step's count), also on the second update of a rollout batch (rl.num_iterations 2, the old
    policy's log-probs). The 1-rank run's checkpoint between two updates resumes on 2 ranks (each takes one of the
    saved micro batches) and continues the same run. ZeRO-2, LoRA."""
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    common = ["adapter.method=lora", "adapter.dropout=0", "distributed.zero_stage=2", "train.max_steps=3",
              "optimizer.lr=5e-3", "train.micro_batch_size=1", "rl.num_iterations=2", "checkpoint.every_steps=1",
              "checkpoint.keep_last=3"]
    run_ft("train", *rl_args(one, *common, "train.grad_accum_steps=2"))
    run_ft("launch", *rl_args(two, *common, "train.grad_accum_steps=1"), "--nproc", "2")
    a, b = steps(one), steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # Step 1 (the same weights): the same completions; their rewards summed in another order (over ranks).
    assert a[0]["completion_length"] == b[0]["completion_length"]
    assert a[0]["completion_length_max"] == b[0]["completion_length_max"]
    assert a[0]["reward"] == pytest.approx(b[0]["reward"], rel=1e-12)
    for x, y in zip(a, b):
        for key in ("loss", "reward", "kl", "clip_ratio"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert a[1]["clip_ratio"] > 0  # (the second update's ratios are no longer 1)
    resumed = run_ft("launch", *rl_args(moved, *common, "train.grad_accum_steps=1"), "--nproc", "2", "--resume",
                     str(one / "checkpoints" / step_dir_name(1)))
    assert "world size changed from 1 to 2" in resumed.stdout, resumed.stdout[-3000:]
    c = steps(moved)
    assert [r["step"] for r in c] == [2, 3]
    for x, y in zip(a[1:], c):
        for key in ("loss", "reward", "kl", "clip_ratio"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("generation", ["auto", "layered"])
def test_qlora_grpo_on_two_zero3_ranks(tmp_path, generation):
    """2 processes, ZeRO-3, QLoRA: the policy generates with the whole model gathered (auto: the tiny model fits)
    or fetching each layer in step with the other rank (layered, here with dynamic sampling, where a rank that
    needs no more prompts keeps generating in step while the other draws), trains, and the adapter is saved; the
    log says which way the weights met generation."""
    out = tmp_path / "run"
    extra = ["rl.dynamic_sampling_draws=2",
             "rl.rewards=[{function: tests.reward_fns:letter_share_on_odd_answers}]"] * (generation == "layered")
    launched = run_ft("launch", *rl_args(out, "adapter.method=qlora", "distributed.zero_stage=3", "train.max_steps=2",
                                         "model.dtype=bfloat16", "optimizer.lr=5e-3", "data.audit=true",
                                         f"rl.zero3_generation={generation}", *extra), "--nproc", "2")
    said = {"auto": "the whole model gathered on every rank", "layered": "fetches every layer from the other ranks"}
    assert said[generation] in launched.stdout, launched.stdout[-3000:]
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["completion_length"] > 0 for r in rows)
    first = [read_jsonl(out / "audit" / f"rank{k}.jsonl")[0]["samples"] for k in range(2)]
    if generation == "layered":
        assert rows[0]["unresampled_groups"] == 0 and first[0] != first[1]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_ft_plan_counts_every_completion_row():
    """A prompt of the micro batch is num_generations rows of prompt + completion in the forward that trains."""
    from ftcore.tools.plan import micro_batch_tokens

    cfg = load_config(None, [*RL, "train.micro_batch_size=3", "rl.num_generations=6", "data.max_seq_len=128"])
    assert micro_batch_tokens(cfg) == 3 * 6 * 128


def test_a_kept_rollout_batch_is_restored_or_refused_in_one_line():
    """Rollouts.load_state_dict: a checkpoint between two updates without its rollout batch is refused; one from
    2 ranks is taken by 1 rank whole (its counts merged into the first micro batch); micro batches of another
    size are refused naming train.micro_batch_size; a checkpoint at a rollout boundary needs nothing."""
    from types import SimpleNamespace

    from ftcore.tasks.rollouts import Rollouts

    cfg = load_config(None, [*RL, "rl.num_iterations=2", "rl.num_generations=2", "train.micro_batch_size=1"])
    rollouts = object.__new__(Rollouts)
    rollouts.cfg, rollouts.runtime, rollouts.buffer = cfg, SimpleNamespace(rank=0, world_size=1), None

    def saved(rank: int, rows: int = 2) -> dict:
        return {"step": 2, "micro": [{"rows": [[[1], [2], True]] * rows, "sample_ids": [], "positions": [],
                                      "advantages": None, "old_logps": None,
                                      "counts": {"completions": 2.0, **({"at_max": 1.0} if rank == 0 else {})}}]}

    rollouts.load_state_dict([], 4)  # a rollout boundary: the next step generates anew
    assert rollouts.buffer is None
    with pytest.raises(ValueError, match="saved at step 3, inside the rollout batch of step 3 .* without"):
        rollouts.load_state_dict([], 3)
    rollouts.load_state_dict([saved(0), saved(1)], 3)
    assert len(rollouts.buffer["micro"]) == 2 and rollouts.buffer["step"] == 2
    assert rollouts.buffer["micro"][0]["counts"] == {"at_max": 1.0, "completions": 4.0}
    assert rollouts.buffer["micro"][1]["counts"] == {}
    with pytest.raises(ValueError, match="train.micro_batch_size as it was"):
        rollouts.load_state_dict([saved(0, rows=4)], 3)
