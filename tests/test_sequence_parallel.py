"""distributed.sequence_parallel (Ulysses through DeepSpeed's UlyssesSPAttentionHF) with real processes on CPU
(gloo has the all-to-all Ulysses needs): N ranks splitting each sample's tokens train exactly what one rank
without it trains on the same samples; with data parallelism beside it, what the data-parallel run trains; a
resume continues bit for bit; what it cannot do is refused in one line before launch.

Tolerance: fp32; the split sequence sums each token's loss on another rank and in another order, and the
attention exchange regroups heads, so losses, gradient norms and eval losses agree to rel 1e-5."""

from __future__ import annotations

import pytest
import torch

from ftcore.config import ConfigError, load_config
from ftcore.data.batch import collate
from ftcore.data.formats import IGNORE_INDEX, Tokenized
from ftcore.train.sequence_parallel import model_inputs, sequence_shard
from tests.conftest import ft_in_process, read_jsonl, run_ft

BASE = ("examples/chat-demo.yaml", "--set", "train.max_steps=6", "--set", "optimizer.warmup_steps=1", "--set",
        "train.micro_batch_size=2", "--set", "data.max_seq_len=64", "--set", "logging.every=1", "--set",
        "evaluation.every=3", "--set", "checkpoint.every_steps=0", "--set", "model.dtype=float32", "--set",
        "adapter.dropout=0")


def run(out, *extra: str, nproc: int = 1) -> dict:
    args = [*BASE, "--set", f"output_dir={out}", *(w for s in extra for w in ("--set", s))]
    proc = run_ft("train", *args) if nproc == 1 else run_ft("launch", *args, "--nproc", str(nproc))
    rows = read_jsonl(out / "metrics.jsonl")
    return {"proc": proc, "loss": [r["loss"] for r in rows if "lr" in r],
            "grad_norm": [r["grad_norm"] for r in rows if "lr" in r],
            "trained": [r["trained_tokens"] for r in rows if "lr" in r],
            "eval": [r["eval_loss"] for r in rows if "eval_loss" in r]}


def assert_same_training(got: dict, want: dict) -> None:
    assert got["trained"] == want["trained"] and len(got["loss"]) == 6 and len(got["eval"]) == 2
    for key in ("loss", "eval"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    if want["grad_norm"][0] is not None:
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------------- the split
def test_a_shard_holds_its_part_of_every_row_with_labels_shifted_before_the_split():
    rows = [Tokenized([5, 6, 7, 8, 9], [IGNORE_INDEX, 6, 7, 8, 9]),
            Tokenized([5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 7])]
    batch = collate(rows, 0, ["a", "b"])
    parts = [sequence_shard(batch, i, 2, rows=3) for i in range(2)]
    assert [p.input_ids.shape for p in parts] == [(3, 3), (3, 3)]  # width 5 -> 6, rows 2 -> 3
    assert parts[0].input_ids[0].tolist() == [5, 6, 7] and parts[1].input_ids[0].tolist() == [8, 9, 0]
    # Shifted: position t's label is token t + 1, so the first part's last token learns the second part's first.
    assert parts[0].labels[0].tolist() == [6, 7, 8]
    assert parts[1].labels[0].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX]
    assert parts[1].position_ids[0].tolist() == [3, 4, 5]  # global positions
    assert sum(p.trained_tokens for p in parts) == batch.trained_tokens
    assert all(p.labels[2].eq(IGNORE_INDEX).all() for p in parts)  # the padding row trains nothing
    inputs = model_inputs(parts[0], "cpu").with_labels()
    assert "attention_mask" not in inputs and "labels" not in inputs and "shift_labels" in inputs


# ------------------------------------------------------------------------------------------------ runs
@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("layout", [
    ("distributed.zero_stage=2", "model.gradient_checkpointing=true"),
    ("distributed.zero_stage=3", "adapter.method=full"),
    ("distributed.zero_stage=3", "adapter.method=qlora", "loss.base_kl=0.2"),
], ids=["zero2-lora-checkpointing", "zero3-full", "zero3-qlora-base_kl"])
def test_two_ranks_splitting_each_sample_train_what_one_rank_trains(tmp_path, layout):
    """The same samples on 1 rank without sequence parallelism and on 2 ranks with N=2 (one data-parallel group):
    equal losses, gradient norms and eval losses; the log says how the ranks are laid out."""
    want = run(tmp_path / "one", *layout)
    got = run(tmp_path / "split", *layout, "distributed.sequence_parallel=2", nproc=2)
    assert "sequence parallel: 2 ranks split each sample's tokens (Ulysses), 1 data-parallel group" in \
        got["proc"].stdout
    assert "effective batch 2 |" in got["proc"].stdout
    assert_same_training(got, want)


@pytest.mark.multiproc
@pytest.mark.trains
def test_sequence_groups_beside_data_parallelism_train_what_data_parallelism_trains(tmp_path):
    """4 ranks = 2 sequence groups of 2 (each its own share of the data) vs 2 data-parallel ranks."""
    want = run(tmp_path / "dp", "distributed.zero_stage=2", nproc=2)
    got = run(tmp_path / "sp_dp", "distributed.zero_stage=2", "distributed.sequence_parallel=2", nproc=4)
    assert "2 data-parallel groups" in got["proc"].stdout
    assert_same_training(got, want)


@pytest.mark.multiproc
@pytest.mark.trains
def test_a_sequence_parallel_run_resumes_exactly(tmp_path):
    """Stopped at step 3 and resumed (the data state saved once per sequence group): the uninterrupted run's
    losses bit for bit."""
    layout = ("distributed.zero_stage=2", "distributed.sequence_parallel=2", "checkpoint.every_steps=3")
    straight = run(tmp_path / "straight", *layout, nproc=2)
    run(tmp_path / "resumed", *layout, "train.stop_at_step=3", nproc=2)
    resumed = run(tmp_path / "resumed", *layout, nproc=2)
    assert "resumed from" in resumed["proc"].stdout
    assert resumed["loss"] == straight["loss"] and resumed["eval"] == straight["eval"]
    import json

    states = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000003" / "data_state.json").read_text())
    assert len(states) == 1  # two ranks, one data stream


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,message", [
    (["data.max_seq_len=63"], "data.max_seq_len: 63 is not a multiple of distributed.sequence_parallel=2"),
    (["model.attn_implementation=eager"], "model.attn_implementation: eager does not apply with"),
    (["loss.impl=full"], "loss.impl: full does not apply with distributed.sequence_parallel=2"),
    (["data.packing=true"], "data.packing: does not apply with distributed.sequence_parallel=2 unless"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]"], "task: classification"),
])
def test_what_ulysses_cannot_do_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("examples/chat-demo.yaml", ["distributed.sequence_parallel=2", "data.eval=null",
                                                "evaluation.every=0", *overrides])


@pytest.mark.parametrize("overrides,nproc,message", [
    (["distributed.sequence_parallel=2"], 3, "distributed.sequence_parallel: 2 does not divide the world size 3"),
    (["distributed.sequence_parallel=8", "data.max_seq_len=64"], 8,
     "distributed.sequence_parallel: 8 does not divide the model's 4 attention heads"),
    (["distributed.sequence_parallel=2", "train.effective_batch_size=16"], 2,
     "micro_batch_size 8 x grad_accum_steps 1 x 1 data-parallel groups = 8"),
])
def test_what_the_world_or_the_model_rule_out_is_refused_before_launch(overrides, nproc, message):
    args = [w for o in overrides for w in ("--set", o)]
    proc = ft_in_process("launch", "examples/chat-demo.yaml", "--nproc", str(nproc), "--dry-run", *args,
                         check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_objectives_split_their_sequences_too(tmp_path, objective):
    """DPO pairs (chosen and rejected rows split alike) and KTO (its mismatched rows too, the reference point
    from the whole rows): 2 ranks with N=2 train and evaluate what 1 rank does; the pair/sample counts are the
    data's, not doubled."""
    from tests.test_kto import kto_task
    from tests.test_preference import repeat_task

    if objective == "dpo":
        data, held_out = repeat_task(tmp_path / "d.jsonl", 100, 1), repeat_task(tmp_path / "e.jsonl", 5, 2)
        settings = ("task=preference", f"data.train=[{{path: {data}, format: preference}}]",
                    f"data.eval=[{{path: {held_out}, format: preference}}]")
    else:
        data, held_out = kto_task(tmp_path / "d.jsonl", 100, 1), kto_task(tmp_path / "e.jsonl", 5, 2)
        settings = ("task=preference", "preference.loss=kto", f"data.train=[{{path: {data}, format: kto}}]",
                    f"data.eval=[{{path: {held_out}, format: kto}}]")
    metrics = {}
    for name, extra, nproc in (("one", (), 1), ("split", ("distributed.sequence_parallel=2",), 2)):
        out = tmp_path / name
        args = [*BASE, "--set", f"output_dir={out}", *(w for s in (*settings, *extra) for w in ("--set", s))]
        run_ft("train", *args) if nproc == 1 else run_ft("launch", *args, "--nproc", "2")
        metrics[name] = read_jsonl(out / "metrics.jsonl")
    keys = ("loss", "reward_accuracy", "logps_chosen") + (("kl",) if objective == "kto" else ("reward_margin",))
    for key in keys:
        want = [r[key] for r in metrics["one"] if "lr" in r and key in r]
        got = [r[key] for r in metrics["split"] if "lr" in r and key in r]
        assert len(want) == 6 and got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    evals = [[r for r in metrics[name] if "eval_loss" in r] for name in ("one", "split")]
    count = "eval_pairs" if objective == "dpo" else "eval_samples"
    assert [e[count] for e in evals[1]] == [e[count] for e in evals[0]] == [5, 5]
    for want, got in zip(*evals):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_packed_rows_become_one_varlen_row_with_per_sample_positions():
    """Packing under sequence parallelism (flash_attention_2 only): the rows are joined into one, each sample's
    positions restarting at 0, so flash-attention keeps the samples apart after Ulysses' all-gather."""
    from ftcore.data.batch import Piece, collate_packed

    pieces = [[Piece((0, 0), Tokenized([5, 6, 7], [IGNORE_INDEX, 6, 7]), "a"),
               Piece((1, 0), Tokenized([8, 9], [IGNORE_INDEX, 9]), "b")],
              [Piece((2, 0), Tokenized([3, 4, 5, 6], [IGNORE_INDEX, 4, 5, 6]), "c")]]
    batch = collate_packed(pieces, 0)
    parts = [sequence_shard(batch, i, 2, rows=1, one_row=True) for i in range(2)]
    joined = torch.cat([p.position_ids for p in parts], dim=1)[0].tolist()
    assert joined[:9] == [0, 1, 2, 0, 1, 0, 1, 2, 3] and all(p.input_ids.shape[0] == 1 for p in parts)
    assert sum(p.trained_tokens for p in parts) == batch.trained_tokens  # no sample learns its neighbour's start
    assert parts[0].sample_ids == ["a", "b", "c"]
    # An unpacked (eval) batch in the same run: its rows joined, each row's positions restarting.
    plain = collate([Tokenized([5, 6, 7], [IGNORE_INDEX, 6, 7]), Tokenized([8, 9], [IGNORE_INDEX, 9])], 0, [])
    halves = [sequence_shard(plain, i, 2, rows=1, one_row=True) for i in range(2)]
    assert torch.cat([h.position_ids for h in halves], dim=1)[0].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.trains
def test_packing_under_sequence_parallelism_on_gpus(tmp_path):
    """Packed samples stay apart under Ulysses with flash-attention: N=2 on 2 GPUs equals 1 GPU."""
    import importlib.util

    if torch.cuda.device_count() < 2 or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs 2 CUDA GPUs and flash-attn (Ulysses splits a sample over 2 ranks, one GPU each); "
                    f"this machine has {torch.cuda.device_count()} GPUs")
    layout = ("data.packing=true", "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16")
    want = run(tmp_path / "one", *layout)
    got = run(tmp_path / "split", *layout, "distributed.sequence_parallel=2", nproc=2)
    assert got["trained"] == want["trained"]
    assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
