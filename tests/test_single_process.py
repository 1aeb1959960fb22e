"""`ft train` in a plain process (a world of one, ZeRO-0), rerun behaviour, and generation from the output."""

import pytest

from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_run_args

pytestmark = pytest.mark.trains

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run_ft("train", *tiny_run_args(out, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=4"))
    return out


def test_plain_process_trains_and_saves(run_dir):
    losses = [r["loss"] for r in read_jsonl(run_dir / "audit" / "rank0.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (run_dir / "ds_config.json").is_file() and (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("*.tmp")) and not list((run_dir / "checkpoints").glob("*.tmp"))


def test_rerunning_a_finished_run_trains_nothing(run_dir):
    proc = run_ft("train", *tiny_run_args(run_dir, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=4"))
    assert "nothing to train: checkpoint is at step 4" in proc.stdout
    assert len(read_jsonl(run_dir / "audit" / "rank0.jsonl")) == 4


def test_resuming_under_a_different_config_is_refused(run_dir):
    proc = run_ft("train", *tiny_run_args(run_dir, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=4",
                                          "--set", "adapter.r=8"), check=False)
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert "was written by a different config" in message and "adapter" in message and "'r': 8" in message


def test_generate_from_the_adapter(run_dir):
    proc = ft_in_process("generate", "--model", str(run_dir / "final"), "--prompt", "What is 2 plus 3?",
                         "--max-new-tokens", "5")
    assert proc.stdout.startswith("user: What is 2 plus 3?\nassistant:")


def test_cpu_offloaded_optimizer_trains(tmp_path):
    """ZeRO-2 with the optimizer offloaded to the host (DeepSpeed's CPU Adam, JIT-built once)."""
    out = tmp_path / "offload"
    run_ft("train", *tiny_run_args(out, "--set", "distributed.offload=optimizer", "--set", "train.max_steps=4"))
    rows = read_jsonl(out / "audit" / "rank0.jsonl")
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    # 2 linear warmup steps to 3e-3, then cosine to 0 at step 4: the engine steps the schedule once per step.
    assert lrs == pytest.approx([0.0, 1.5e-3, 3e-3, 1.5e-3])
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_resume_from_a_directory_that_is_not_a_checkpoint_is_refused(run_dir, tmp_path):
    proc = run_ft("train", *tiny_run_args(run_dir, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=4"),
                  "--resume", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path}: not a complete checkpoint (no manifest.json)"


def test_resuming_an_older_checkpoint_starts_a_new_timeline(tmp_path):
    """`--resume step-2` of a run that reached step 4: the old step-4 is moved to checkpoints/superseded/ (kept),
    the new timeline's checkpoints are the only ones an automatic resume can find, and it trains the same."""
    out = tmp_path / "run"
    args = tiny_run_args(out, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=4",
                         "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=3")
    run_ft("train", *args)
    root = out / "checkpoints"
    first_losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    old_step_4 = (root / "step-000004" / "manifest.json").stat().st_ino
    proc = run_ft("train", *args, "--resume", str(root / "step-000002"))
    assert "step-000004 moved to" in proc.stdout
    (moved,) = (root / "superseded").iterdir()
    assert (moved / "step-000004" / "manifest.json").stat().st_ino == old_step_4  # moved, not rewritten
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004"]
    assert (root / "latest").read_text().strip() == "step-000004"
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert losses == first_losses + first_losses[2:]  # steps 3 and 4 again, exactly
