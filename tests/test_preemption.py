"""Preemption on a workstation: SIGTERM to `ft launch` (or SIGUSR1 to a bare `ft train`) mid-run -> every rank
stops at the same step boundary, a checkpoint is saved, the exit status is 75; rerunning the same command resumes
and ends with exactly the weights of an uninterrupted run. Real processes and signals throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_same_final_adapter, read_jsonl, run_ft, tiny_run_args
from tests.conftest import STOPPABLE_STEPS as STEPS
from tests.conftest import stoppable_run_args as args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]


def start(command: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", command, *args(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_after_steps(proc: subprocess.Popen, out: Path, steps: int, sig: int, timeout_s: float = 300) -> None:
    """Send `sig` once metrics.jsonl shows `steps` finished steps (the run is then mid-way)."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the signal: {proc.stdout.read()[-3000:]}")
        if metrics.is_file() and len(read_jsonl(metrics)) >= steps:
            proc.send_signal(sig)
            return
        time.sleep(0.05)
    raise AssertionError("run did not reach the step to signal at")


def test_sigterm_to_ft_launch_checkpoints_exits_75_and_resumes_exactly(uninterrupted_run, tmp_path):
    out = tmp_path / "run"
    proc = start("launch", out, "--nproc", "2")
    signal_after_steps(proc, out, 5, signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-3000:]
    assert "SIGTERM received: asked 2 training processes to checkpoint" in log
    stopped = [r["step"] for r in read_jsonl(out / "audit" / "rank0.jsonl")][-1]
    assert 5 <= stopped < STEPS
    # Both ranks stopped after the same step, and the checkpoint of that step is the latest.
    assert [r["step"] for r in read_jsonl(out / "audit" / "rank1.jsonl")][-1] == stopped
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:06d}"
    assert f"preemption: stopped at step {stopped}" in log
    assert not (out / "final").exists()

    resumed = run_ft("launch", *args(out), "--nproc", "2")
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:06d}'} at step {stopped}" in resumed.stdout
    straight_losses = [r["loss"] for r in read_jsonl(uninterrupted_run / "audit" / "rank0.jsonl")]
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert losses == straight_losses
    assert_same_final_adapter(out, uninterrupted_run)


def test_sigusr1_to_a_bare_ft_train_process(tmp_path):
    """Without a launcher (plain python / srun ft train): the process itself handles the signal."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *args(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signal_after_steps(proc, out, 3, signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-3000:]
    stopped = [r["step"] for r in read_jsonl(out / "audit" / "rank0.jsonl")][-1]
    assert f"stopped at step {stopped} on SIGUSR1: checkpoint {out / 'checkpoints' / f'step-{stopped:06d}'}" in log
    rerun = run_ft("train", *args(out), env=env)
    assert f"at step {stopped}" in rerun.stdout and (out / "final" / "adapter_model.safetensors").is_file()


def test_a_failing_rank_is_named_with_the_tail_of_its_log(tmp_path):
    """A rank that fails (here: its data has a malformed record the other rank never reads) is reported by the
    launcher as the first failure, with its reason and the end of its log."""
    data = tmp_path / "data.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}'
    data.write_text("\n".join([good] * 40 + ["{not json"] + [good] * 40) + "\n")
    out = tmp_path / "run"
    proc = run_ft("launch", *tiny_run_args(out, "--set", f"data.train=[{{path: {data}, format: chat}}]",
                                           "--set", "data.shuffle=false", "--set", "train.max_steps=30",
                                           "--set", "data.packing=false", "--set", "distributed.stop_grace_s=3"),
                  "--nproc", "2", check=False)
    assert proc.returncode == 1
    report = [line for line in proc.stderr.splitlines() if "failed first" in line]
    assert len(report) == 1, proc.stderr[-3000:]
    assert f"{data}:41: invalid JSON" in report[0]
    assert "last " in proc.stderr and "lines of" in proc.stderr


def test_a_stop_signal_during_teardown_of_a_finished_run_changes_nothing(tmp_path):
    """Found by the fault suite: a SIGTERM to `ft launch` just after training finished reached ranks that were
    already shutting down, where CPython has put the default action back, and killed them: a complete run reported
    failure. Here SIGUSR1 is sent every few ms from the end-of-run line until the process is gone."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train",
                             *tiny_run_args(out, "--set", "distributed.zero_stage=0", "--set", "train.max_steps=2")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("outputs:"):
            break
    sent = 0
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGUSR1)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.002)
    log.append(proc.stdout.read())
    proc.wait()
    assert sent > 0 and proc.returncode == 0, "".join(log)[-3000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
