"""distributed.sequence_parallel (Ulysses through DeepSpeed's UlyssesSPAttentionHF) with real processes on CPU
(gloo has the all-to-all Ulysses needs): N ranks splitting each sample's tokens train exactly what one rank
without it trains on the same samples; with data parallelism beside it, what the data-parallel run trains; a
resume continues bit for bit; what it cannot do is refused in one line before launch.

Tolerance: fp32; the split sequence sums each token's loss on another rank and in another order, and the
attention exchange regroups heads, so losses, gradient norms and eval losses agree to rel 1e-5."""

from __future__ import annotations

import pytest

from ftcore.config import ConfigError, load_config
from ftcore.data.batch import collate
from ftcore.data.formats import IGNORE_INDEX, Tokenized
from tests.conftest import read_jsonl, run_ft

BASE = ("examples/demo.yaml", "--set", "train.max_steps=6", "--set", "train.warmup_steps=1", "--set",
        "train.micro_batch_size=2", "--set", "data.max_seq_len=64", "--set", "train.log_every=1", "--set",
        "train.eval_every=3", "--set", "checkpoint.every_steps=0", "--set", "model.dtype=float32", "--set",
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
    parts = [batch.sequence_shard(i, 2, rows=3) for i in range(2)]
    assert [p.input_ids.shape for p in parts] == [(3, 3), (3, 3)]  # width 5 -> 6, rows 2 -> 3
    assert parts[0].input_ids[0].tolist() == [5, 6, 7] and parts[1].input_ids[0].tolist() == [8, 9, 0]
    # Shifted: position t's label is token t + 1, so the first part's last token learns the second part's first.
    assert parts[0].labels[0].tolist() == [6, 7, 8]
    assert parts[1].labels[0].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX]
    assert parts[1].position_ids[0].tolist() == [3, 4, 5]  # global positions
    assert sum(p.trained_tokens for p in parts) == batch.trained_tokens
    assert all(p.labels[2].eq(IGNORE_INDEX).all() for p in parts)  # the padding row trains nothing
    inputs = parts[0].model_inputs("cpu")
    assert "attention_mask" not in inputs and "labels" not in inputs and "shift_labels" in inputs


# ------------------------------------------------------------------------------------------------ runs
@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [
    ("distributed.zero_stage=2",),
    ("distributed.zero_stage=3", "adapter.method=full"),
    ("distributed.zero_stage=3", "adapter.method=qlora", "train.base_kl=0.2"),
], ids=["zero2-lora", "zero3-full", "zero3-qlora-base_kl"])
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
def test_sequence_groups_beside_data_parallelism_train_what_data_parallelism_trains(tmp_path):
    """4 ranks = 2 sequence groups of 2 (each its own share of the data) vs 2 data-parallel ranks."""
    want = run(tmp_path / "dp", "distributed.zero_stage=2", nproc=2)
    got = run(tmp_path / "sp_dp", "distributed.zero_stage=2", "distributed.sequence_parallel=2", nproc=4)
    assert "2 data-parallel groups" in got["proc"].stdout
    assert_same_training(got, want)


@pytest.mark.multiproc
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
    (["train.loss_impl=full"], "train.loss_impl: full does not apply with distributed.sequence_parallel=2"),
    (["data.packing=true"], "data.packing: does not apply with distributed.sequence_parallel=2 unless"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]"], "task: classification"),
])
def test_what_ulysses_cannot_do_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("examples/demo.yaml", ["distributed.sequence_parallel=2", "data.eval=null", "train.eval_every=0",
                                           *overrides])


@pytest.mark.parametrize("overrides,nproc,message", [
    (["distributed.sequence_parallel=2"], 3, "distributed.sequence_parallel: 2 does not divide the world size 3"),
    (["distributed.sequence_parallel=8", "data.max_seq_len=64"], 8,
     "distributed.sequence_parallel: 8 does not divide the model's 4 attention heads"),
    (["distributed.sequence_parallel=2", "train.effective_batch_size=16"], 2,
     "micro_batch_size 8 x grad_accum_steps 1 x 1 data-parallel groups = 8"),
])
def test_what_the_world_or_the_model_rule_out_is_refused_before_launch(overrides, nproc, message):
    args = [w for o in overrides for w in ("--set", o)]
    proc = run_ft("launch", "examples/demo.yaml", "--nproc", str(nproc), "--dry-run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
