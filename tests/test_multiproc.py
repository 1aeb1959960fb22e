"""Real 2-process training through the real launcher (`ft launch` -> accelerate -> DeepSpeed, gloo on CPU).

Checked: accelerate and torch.distributed see a world of 2; the ranks read disjoint samples; loss falls; ZeRO-3
really partitions parameters; final outputs load with transformers/peft and reproduce the trained weights as
DeepSpeed's own consolidation (zero_to_fp32) reads them from the checkpoint; stop + resume equals a straight run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ft_in_process, plan_matches_engine, read_jsonl, run_ft, tiny_args, tiny_run_args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

PROBE = torch.tensor([[1, 523, 28766, 1838, 28766, 28767, 13, 3195, 349, 272, 5565, 302, 4843, 28804, 13]])


def launch(out: Path, *extra: str, nproc: int = 2):
    return run_ft("launch", *tiny_run_args(out, *extra), "--nproc", str(nproc))


@pytest.fixture(scope="module")
def runs(training_runs):
    """The runs several tests look at: (output dir, console output), from the session's TrainingRuns (each
    distinct config runs once per session). Read-only: a test that changes one works on a copy."""

    def get(name: str, *extra: str) -> tuple[Path, str]:
        return training_runs.get(*tiny_args(*(extra or EXPORT_RUNS.get(name, ()))))

    return get


RUN_ARGS = {
    "zero2_lora": (),
    "zero3_lora": ("--set", "distributed.zero_stage=3", "--set", "distributed.zero3_param_persistence_threshold=0",
                   "--set", "model.gradient_checkpointing=true"),
    "zero2_full": ("--set", "adapter.method=full", "--set", "optimizer.lr=1e-3"),
    "zero3_full": ("--set", "adapter.method=full", "--set", "optimizer.lr=1e-3", "--set", "distributed.zero_stage=3",
                   "--set", "distributed.zero3_param_persistence_threshold=0"),
}


def step_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]


@pytest.mark.parametrize("name", list(RUN_ARGS))
def test_two_ranks_see_world_of_two_and_disjoint_data_and_loss_falls(runs, name):
    out, log = runs(name, *RUN_ARGS[name])
    for rank in (0, 1):
        world = json.loads((out / "audit" / f"rank{rank}_world.json").read_text())
        assert world["accelerate_num_processes"] == 2 and world["dist_world_size"] == 2
        assert world["accelerate_process_index"] == rank
    seen = [[s for r in read_jsonl(out / "audit" / f"rank{rank}.jsonl") for s in r["samples"]] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8 * 4
    assert not set(seen[0]) & set(seen[1]), "ranks read the same samples"
    assert len(set(seen[0])) == len(seen[0])
    # Both ranks agree on the global step loss (it is all-reduced) and it falls.
    losses = [step_losses(out), [r["loss"] for r in read_jsonl(out / "audit" / "rank1.jsonl")]]
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0] - 0.05, losses[0]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["loss"] for m in metrics if "loss" in m] == losses[0]
    assert any("eval_loss" in m for m in metrics)
    assert "world size 2" in log


@pytest.mark.parametrize("name", ["zero3_lora", "zero3_full"])
def test_zero3_partitions_parameters(runs, name):
    out, _ = runs(name, *RUN_ARGS[name])
    for rank in (0, 1):
        world = json.loads((out / "audit" / f"rank{rank}_world.json").read_text())
        # Each rank holds about half of every parameter (padding makes it slightly more).
        assert world["local_param_numel"] < 0.51 * world["full_param_numel"], world


def test_zero2_keeps_full_parameters(runs):
    out, _ = runs("zero2_lora")
    world = json.loads((out / "audit" / "rank0_world.json").read_text())
    assert world["local_param_numel"] == world["full_param_numel"]


def _consolidated(out: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of the last checkpoint (the reference for what was trained)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(latest), tag="engine")


@pytest.mark.parametrize("name", ["zero2_lora", "zero3_lora"])
def test_final_adapter_loads_and_reproduces_trained_model(runs, name, builtin_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = runs(name, *RUN_ARGS[name])
    final = out / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert len(adapter) == 4 * 7 * 2  # 4 layers x 7 linear modules x (A, B)
    assert all(t.numel() > 0 for t in adapter.values())
    assert (final / "tokenizer.json").is_file()

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), final).eval()
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trained = _consolidated(out)
    assert trained and all("lora_" in k for k in trained)
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    reference.eval()
    with torch.no_grad():
        got, want = loaded(PROBE).logits, reference(PROBE).logits
        base = AutoModelForCausalLM.from_pretrained(builtin_model_dir)(PROBE).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter really changes the model


@pytest.mark.parametrize("name", ["zero2_full", "zero3_full"])
def test_final_full_model_loads_and_reproduces_trained_model(runs, name, builtin_model_dir):
    from transformers import AutoModelForCausalLM

    out, _ = runs(name, *RUN_ARGS[name])
    loaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    trained = _consolidated(out)
    reference = AutoModelForCausalLM.from_pretrained(builtin_model_dir)
    reference.load_state_dict(trained, strict=True)
    reference.eval()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, reference(PROBE).logits, atol=0, rtol=0)


def test_resume_equals_uninterrupted_run(runs, tmp_path):
    from safetensors.torch import load_file

    straight, _ = runs("zero2_lora")
    out = tmp_path / "resumed"
    launch(out, "--set", "train.stop_at_step=4")
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    second = launch(out)
    assert "resumed from" in second.stdout + second.stderr and "step 4" in second.stdout + second.stderr
    assert step_losses(out) == step_losses(straight)  # exact, fp32 on CPU
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(straight / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2: step-000004 and step-000008 remain, nothing half-written.
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000004", "step-000008"], ckpts


def test_accumulation_and_data_parallelism_train_the_same_thing(runs, tmp_path):
    """1 process x 2 accumulated micro batches sees the same 8 samples per step as 2 processes x 1: the loss is
    normalised over the trained tokens of the whole effective batch, so steps and weights must agree."""
    from safetensors.torch import load_file

    two_ranks, _ = runs("zero2_lora")
    out = tmp_path / "one_rank"
    run_ft("train", *tiny_run_args(out, "--set", "train.grad_accum_steps=2"))
    one = read_jsonl(out / "audit" / "rank0.jsonl")
    two = [read_jsonl(two_ranks / "audit" / f"rank{r}.jsonl") for r in (0, 1)]
    for step in range(8):
        assert sorted(one[step]["samples"]) == sorted(two[0][step]["samples"] + two[1][step]["samples"])
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two[0]], rel=1e-5)
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(two_ranks / "final" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_elastic_resume_two_ranks_to_one_continues_the_same_run(runs, tmp_path, stage):
    """Stop a 2-process run, resume it with 1 process (accumulating 2 micro batches to keep the effective
    batch): DeepSpeed re-partitions the optimizer state, the data stream is resharded, and the run goes on to
    train on the same samples, with the same losses, as the uninterrupted 2-process run."""
    from safetensors.torch import load_file

    zero = ("--set", f"distributed.zero_stage={stage}")
    straight, _ = runs("zero2_lora") if stage == 2 else runs(f"zero{stage}_lora", *zero)
    out = tmp_path / "elastic"
    launch(out, *zero, "--set", "train.stop_at_step=4")
    resumed = run_ft("train", *tiny_run_args(out, *zero, "--set", "train.grad_accum_steps=2"))
    assert "world size changed from 2 to 1" in resumed.stdout
    before = [r for r in read_jsonl(out / "audit" / "rank0.jsonl") + read_jsonl(out / "audit" / "rank1.jsonl")]
    by_step: dict[int, list] = {}
    for record in before:
        by_step.setdefault(record["step"], []).extend(record["positions"])
    positions = [q for step in sorted(by_step) for q in by_step[step]]
    assert sorted(positions) == list(range(64))  # 8 steps x 8 samples: none lost, none repeated
    reference = [read_jsonl(straight / "audit" / f"rank{r}.jsonl") for r in (0, 1)]
    for step in range(1, 9):
        expected = reference[0][step - 1]["positions"] + reference[1][step - 1]["positions"]
        assert sorted(by_step[step]) == sorted(expected)
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")}
    assert [losses[s] for s in range(1, 9)] == pytest.approx(step_losses(straight), rel=1e-5)
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(straight / "final" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3)


def test_elastic_resume_one_rank_to_two_with_packing(tmp_path):
    out = tmp_path / "grow"
    packed = ("--set", "data.packing=true", "--set", "data.packing_buffer=32", "--set", "train.micro_batch_size=2")
    run_ft("train", *tiny_run_args(out, *packed, "--set", "train.grad_accum_steps=2", "--set",
                                   "train.stop_at_step=4"))
    resumed = launch(out, *packed)
    assert "world size changed from 1 to 2" in resumed.stdout
    positions = [q for r in (0, 1) for record in read_jsonl(out / "audit" / f"rank{r}.jsonl")
                 for q in record["positions"]]
    assert len(positions) == len(set(positions)) > 8 * 4  # within the first epoch: nothing trained twice
    assert (out / "final" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "data_report.json").read_text())
    # Summed over both phases and ranks; ~50-token chats in 64-token rows leave gaps (the benchmark measures
    # a realistic mix).
    assert report["packing_efficiency"] == pytest.approx(report["tokens"] / report["row_tokens"])
    assert report["packing_efficiency"] > 0.8
    assert f"packing efficiency {report['packing_efficiency']:.3f}" in resumed.stdout


def test_resume_at_another_world_size_is_refused_where_it_cannot_be_exact(runs, tmp_path):
    import shutil

    zero3, _ = runs("zero3_lora", *RUN_ARGS["zero3_lora"])
    copy = tmp_path / "zero3"
    shutil.copytree(zero3, copy)
    proc = run_ft("train", *tiny_run_args(copy, *RUN_ARGS["zero3_lora"], "--set", "train.grad_accum_steps=2"),
                  check=False)
    assert proc.returncode == 1
    assert "a ZeRO-3 checkpoint written by 2 ranks cannot be resumed by 1; resume with 2 processes" in proc.stderr

    zero2, _ = runs("zero2_lora")
    copy = tmp_path / "zero2"
    shutil.copytree(zero2, copy)
    proc = run_ft("train", *tiny_run_args(copy), check=False)
    assert proc.returncode == 1
    assert ("the effective batch was 8 samples per step, this run's is 4 (micro_batch_size 4 x grad_accum_steps 1 "
            "x 1 processes); set train.grad_accum_steps") in proc.stderr


EXPORT_RUNS = {**RUN_ARGS, "zero1_full": ("--set", "adapter.method=full", "--set", "optimizer.lr=1e-3", "--set",
                                           "distributed.zero_stage=1"),
               "zero0_lora": ("--set", "distributed.zero_stage=0")}


@pytest.mark.parametrize("name", ["zero0_lora", "zero1_full", "zero2_lora", "zero3_lora", "zero2_full", "zero3_full"])
def test_checkpoint_export_is_bit_exact_against_zero_to_fp32(runs, name, tmp_path, builtin_model_dir):
    """Out-of-core consolidation (forced into many small batches) equals DeepSpeed's zero_to_fp32 bit for bit,
    and `ft export --checkpoint` writes exactly that (full) or base + its LoRA merge (adapter runs)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftcore.export.zero import ZeroCheckpoint

    out, _ = runs(name, *EXPORT_RUNS[name])
    ckpt = out / "checkpoints" / "step-000008"
    if name.startswith("zero0"):  # no partitions (zero_to_fp32 does not apply): the engine's module state
        reference = torch.load(ckpt / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        reference = _consolidated(out)
    ours = dict(ZeroCheckpoint(ckpt).iter_tensors(budget_bytes=64 << 10))
    shared = set(ZeroCheckpoint(ckpt).shared)
    assert set(ours) == set(reference) - shared
    for key, tensor in ours.items():
        assert torch.equal(tensor, reference[key]), key

    export = tmp_path / "exported"
    proc = ft_in_process("export", "--checkpoint", str(ckpt), "--out", str(export), "--dtype", "float32",
                         "--shard-size", "8MB")
    assert "verification: passed" in proc.stdout
    index = json.loads((export / "model.safetensors.index.json").read_text())
    state = {}
    for filename in set(index["weight_map"].values()):
        state.update(load_file(export / filename))
    if name.endswith("full"):
        for key, tensor in state.items():
            assert torch.equal(tensor, reference[key]), key
    else:  # the same as PEFT merging the run's final adapter (== the consolidated one) into the base
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                           out / "final").merge_and_unload().state_dict()
        assert set(state) == set(merged)
        for key, tensor in state.items():
            assert torch.equal(tensor, merged[key]), key
    assert AutoModelForCausalLM.from_pretrained(export) is not None


def test_checkpoint_export_with_a_missing_rank_fails_clearly(runs, tmp_path):
    import shutil

    out, _ = runs("zero2_lora")
    ckpt = tmp_path / "step-000008"
    shutil.copytree(out / "checkpoints" / "step-000008", ckpt)
    (ckpt / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (ckpt / "ft_config.yaml").write_text((out / "config.yaml").read_text())
    proc = ft_in_process("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1
    assert "written by 2 ranks, but the optimizer state of rank(s) 1 is missing" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["zero0_lora", "zero1_full", "zero2_lora", "zero3_lora", "zero2_full", "zero3_full"])
def test_ft_plan_predicts_the_bytes_each_rank_holds(runs, name, tmp_path):
    """`ft plan`'s per-rank model states (ZeRO padding included) equal what the real DeepSpeed engine held."""
    out, _ = runs(name, *EXPORT_RUNS[name])
    plan_matches_engine(tiny_run_args(out, *EXPORT_RUNS[name]), out, world=2)
