"""Where this node sits in the job `ft launch` starts: node count and rank, the head node's address and port, and
the name of this attempt's log directory. From the Slurm allocation (`--slurm`), or from the flags (one node by
default, on a free loopback port)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Optional


class TopologyError(ValueError):
    """Flags that do not describe a job, as one line naming them."""


@dataclass(frozen=True)
class NodeTopology:
    """This node's place in the job."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    attempt: str  # the attempt's directory name under output_dir/logs/
    cpus: Optional[int] = None  # CPUs Slurm gave this node (threads per rank are derived from it)


def resolve_topology(env: Mapping[str, str], slurm: bool, nnodes: Optional[int], node_rank: Optional[int],
                     master_addr: Optional[str], master_port: Optional[int]) -> NodeTopology:
    """The topology from the Slurm allocation in `env` (slurm) or from the flags; TopologyError when they
    contradict each other or are incomplete."""
    if slurm:
        from launcher.slurm import SlurmError, rendezvous_from_slurm

        if nnodes is not None or node_rank is not None:
            raise TopologyError("--slurm takes --nnodes and --node-rank from the allocation (SLURM_NNODES, "
                                "SLURM_NODEID); drop them")
        try:
            rdzv = rendezvous_from_slurm(env, master_addr=master_addr, master_port=master_port)
        except SlurmError as e:
            raise TopologyError(f"ft launch --slurm: {e}") from None
        cpus = int(env["SLURM_CPUS_ON_NODE"]) if env.get("SLURM_CPUS_ON_NODE", "").isdigit() else None
        return NodeTopology(rdzv.nnodes, rdzv.node_rank, rdzv.master_addr, rdzv.master_port,
                            f"slurm-{rdzv.job_id}-attempt{rdzv.attempt}", cpus)
    from ftcore.dist_env import free_port

    nnodes = 1 if nnodes is None else nnodes
    node_rank = 0 if node_rank is None else node_rank
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TopologyError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    if nnodes > 1 and (master_addr is None or master_port is None):
        raise TopologyError("--nnodes > 1 needs --master-addr (node 0's address, reachable from every node) and "
                            "--master-port (the same on every node)")
    return NodeTopology(nnodes, node_rank, master_addr or "127.0.0.1", master_port or free_port(),
                        time.strftime("launch-%Y%m%d-%H%M%S") + f"-node{node_rank}")
