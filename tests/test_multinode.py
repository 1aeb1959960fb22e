"""Multi-node launch without Slurm: `ft launch --nnodes 2 --node-rank R --master-addr A --master-port P` started
once per node (here both nodes are this machine), one process each, trains exactly like one 2-process launch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftcore.dist_env import free_port
from tests.conftest import ROOT, assert_same_final_adapter, read_jsonl, run_ft, tiny_run_args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]


def test_two_nodes_by_hand_equal_one_two_process_launch(tmp_path):
    # The same intra-op threads per rank in both topologies. ft launch's default is the node's CPUs over its
    # processes: on this 2-core machine 1 per rank for the 2-process node, 2 per rank for the two 1-process
    # "nodes", and a CPU matmul split over another number of threads sums in another order (the adapter then
    # differs in the last bits, the logged losses do not). Bitwise equality is promised at equal threads per rank.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local, nodes = tmp_path / "local", tmp_path / "nodes"
    run_ft("launch", *tiny_run_args(local), "--nproc", "2", env=env)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "launcher.cli", "launch", *tiny_run_args(nodes), "--nproc", "1",
                               "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                               "--master-port", port], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "[node1 rank1]" in logs[1] and "[node0 rank0] world size 2" in logs[0]
    assert [r["loss"] for r in read_jsonl(nodes / "audit" / "rank0.jsonl")] == \
        [r["loss"] for r in read_jsonl(local / "audit" / "rank0.jsonl")]
    assert_same_final_adapter(nodes, local)
