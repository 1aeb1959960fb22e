"""Multi-node launch without Slurm: `ft launch --nnodes 2 --node-rank R --master-addr A --master-port P` started
once per node (here both nodes are this machine), one process each, trains exactly like one 2-process launch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftcore.dist_env import free_port
from tests.conftest import ROOT, assert_same_final_adapter, read_jsonl, run_ft, tiny_run_args

pytestmark = pytest.mark.multiproc


def test_two_nodes_by_hand_equal_one_two_process_launch(tmp_path):
    local, nodes = tmp_path / "local", tmp_path / "nodes"
    run_ft("launch", *tiny_run_args(local), "--nproc", "2")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "launcher.cli", "launch", *tiny_run_args(nodes), "--nproc", "1",
                               "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                               "--master-port", port], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "[node1 rank1]" in logs[1] and "[node0 rank0] world size 2" in logs[0]
    assert [r["loss"] for r in read_jsonl(nodes / "audit" / "rank0.jsonl")] == \
        [r["loss"] for r in read_jsonl(local / "audit" / "rank0.jsonl")]
    assert_same_final_adapter(nodes, local)
