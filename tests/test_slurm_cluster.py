"""Multi-node training on a real Slurm cluster started on this machine (tests/slurm_cluster.py: slurmctld and two
slurmd daemons emulating nodes n1 and n2). Jobs are submitted with `ft slurm`, exactly as a user would.

If the cluster cannot start here (not root, Slurm not installed), the tests skip with the reason; with
FT_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from ftcore.dist_env import free_port
from launcher.hostlist import expand_hostlist
from tests.conftest import STOPPABLE_STEPS as STEPS
from tests.conftest import assert_same_final_adapter, read_jsonl, run_ft
from tests.conftest import stoppable_run_args as run_args
from tests.slurm_cluster import ClusterUnavailable, LocalSlurm

pytestmark = [pytest.mark.multiproc, pytest.mark.trains, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        slurm = LocalSlurm(root, ctld_port=free_port(), slurmd_ports=(free_port(), free_port())).start()
    except ClusterUnavailable as e:
        if os.environ.get("FT_REQUIRE_SLURM") == "1":
            pytest.fail(f"FT_REQUIRE_SLURM=1 but the local Slurm cluster cannot start: {e}")
        pytest.skip(f"local Slurm cluster unavailable: {e}")
    yield slurm
    slurm.stop()


def submit(cluster: LocalSlurm, out: Path, *extra: str) -> str:
    proc = run_ft("slurm", *run_args(out), *extra, "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
                  "--cpus-per-task", "1", "--grace", "30", "--job-name", "fttest", env=cluster.env)
    match = re.search(r"submitted job (\d+) \(2 nodes x 1 processes\)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def attempt_log(out: Path, job_id: str, attempt: int) -> str:
    return (out / "logs" / f"fttest-{job_id}-attempt{attempt}.log").read_text()


def test_hostlist_parser_agrees_with_scontrol(cluster):
    # (Slurm 22.05 rejects text after the last ']', e.g. "a[1-2]b"; it never writes such a nodelist itself.)
    for expression in ["gpu[01-04,07],cpu3", "rack[1-2]-n[1-2]", "node[098-101]", "a[1,3,5-6]", "n[8-11],m[1-2]",
                       "x1,x1", "x[1-2]y[3-4]", "a[1-2]b[3]", "gpu-a100-[0-1]", "n[0]", "n[7,1-3]"]:
        real = subprocess.run(["scontrol", "show", "hostnames", expression], env=cluster.env, capture_output=True,
                              text=True, check=True).stdout.split()
        assert expand_hostlist(expression) == real, expression


def test_two_node_job_trains_like_a_local_two_process_run(cluster, uninterrupted_run, tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, out)
    info = cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout_s=600)
    log = attempt_log(out, job_id, 0)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] == "n[1-2]"
    # Node 0 and node 1 each ran one rank of a world of 2, rendezvousing at the head node's address.
    assert "[node0 launcher] node 0 of 2, 1 processes, rendezvous at 127.0.0.1:" in log
    assert "[node1 launcher] node 1 of 2" in log
    assert "[node0 rank0] world size 2" in log and "[node1 rank1]" in log
    worlds = [json.loads((out / "audit" / f"rank{r}_world.json").read_text()) for r in (0, 1)]
    assert [w["dist_world_size"] for w in worlds] == [2, 2]
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(uninterrupted_run / "audit" / "rank0.jsonl")]
    assert len(losses) == STEPS
    assert_same_final_adapter(out, uninterrupted_run)


def test_preempted_job_checkpoints_requeues_resumes_and_matches(cluster, uninterrupted_run, tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, out, "--set", "logging.report_to=[tensorboard,mlflow]")  # MLflow: output_dir's sqlite
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and len(read_jsonl(metrics)) >= 5):
        assert time.monotonic() < deadline, "the job did not start training"
        assert cluster.job_state(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env, check=True)
    info = cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout_s=600)
    first, second = attempt_log(out, job_id, 0), attempt_log(out, job_id, 1)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", second[-4000:]
    stopped = int(re.search(r"preemption: stopped at step (\d+)", first).group(1))
    assert 5 <= stopped < STEPS
    assert "USR1 received: asking the training processes to checkpoint and stop" in first
    assert f"requeueing job {job_id}" in first
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:06d}'} at step {stopped}" in second
    assert "training finished" in second
    # The resumed run continues exactly: same losses and same final weights as one uninterrupted run.
    losses = [r["loss"] for r in read_jsonl(out / "audit" / "rank0.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(uninterrupted_run / "audit" / "rank0.jsonl")]
    assert_same_final_adapter(out, uninterrupted_run)
    # The requeued job is one MLflow run: every step once, the attempt on Slurm restart 1 tagged, finished.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["ft.attempts"] == "2", run.data.tags
    assert f"slurm_job {job_id}, slurm_restart 1" in run.data.tags["ft.attempt.2"]
    assert f"from_step {stopped}" in run.data.tags["ft.attempt.2"]
    tracked = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert tracked == [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    assert [s for s, _ in tracked] == list(range(1, STEPS + 1))
