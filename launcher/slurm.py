"""Slurm: the rendezvous of one node's `ft launch --slurm` from its allocation, and the sbatch script `ft slurm`
submits. Pure functions of (env, scontrol's answers) and (template, options), so tests check them for many
allocations; `scontrol` and `sbatch` are only called by the thin wrappers at the bottom.

Rendezvous (every node computes the same answer on its own, nothing is exchanged):
    node count   SLURM_NNODES
    node rank    SLURM_NODEID
    head node    the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`, else launcher/hostlist.py),
                 addressed by its NodeAddr from `scontrol show node` (else its host name)
    port         derived from SLURM_JOB_ID and SLURM_RESTART_COUNT, so jobs sharing a node (and a requeued job's
                 new attempt) do not collide
A multi-node allocation whose head address is a loopback address is refused unless every node is this machine
(the other nodes would each rendezvous with themselves and wait forever).
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from launcher.hostlist import HostlistError, expand_hostlist
from launcher.workstation import RunConfigArgs

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "ft.sbatch"
PORT_BASE, PORT_SPAN = 20000, 40000


class SlurmError(RuntimeError):
    """An allocation ft cannot rendezvous in, naming the variables or values at fault."""


@dataclass(frozen=True)
class NodeInfo:
    """A Slurm node: its name, the address others connect to, and the machine it runs on."""
    name: str
    address: str     # NodeAddr: what other nodes connect to
    hostname: str    # NodeHostName: the machine the node runs on


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's ranks meet the others: node count and rank, head address and port."""
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    hosts: tuple[str, ...]
    job_id: str
    attempt: int


Scontrol = Callable[[Sequence[str]], Optional[str]]  # argv after "scontrol" -> stdout, or None if unavailable


def run_scontrol(args: Sequence[str]) -> Optional[str]:
    """The real scontrol, or None where it is not installed or fails (the caller falls back)."""
    if shutil.which("scontrol") is None:
        return None
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else None


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None or value == "":
        raise SlurmError(f"{name} is not set: run `ft launch --slurm` inside a Slurm allocation, one task per node "
                         "(srun --ntasks-per-node=1 ..., as slurm/ft.sbatch does)")
    try:
        return int(value)
    except ValueError:
        raise SlurmError(f"{name}={value!r} is not an integer") from None


def job_hosts(env: Mapping[str, str], scontrol: Scontrol = run_scontrol) -> list[str]:
    """The allocation's hostnames, in order (scontrol show hostnames)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError("SLURM_JOB_NODELIST is not set: run `ft launch --slurm` inside a Slurm allocation")
    answer = scontrol(["show", "hostnames", nodelist])
    if answer is not None and answer.split():
        return answer.split()
    try:
        return expand_hostlist(nodelist)
    except HostlistError as e:
        raise SlurmError(f"SLURM_JOB_NODELIST: {e}") from None


def node_info(name: str, scontrol: Scontrol = run_scontrol) -> NodeInfo:
    """A node's address and hostname (scontrol show node)."""
    answer = scontrol(["show", "node", "-o", name])
    fields = dict(f.split("=", 1) for f in (answer or "").split() if "=" in f)
    return NodeInfo(name=name, address=fields.get("NodeAddr") or name, hostname=fields.get("NodeHostName") or name)


def _resolve(address: str) -> str:
    try:
        return socket.gethostbyname(address)
    except OSError as e:
        raise SlurmError(f"head node address {address!r} does not resolve ({e}): check DNS or /etc/hosts on this "
                         "node, or pass --master-addr") from None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def derive_port(job_id: str, attempt: int) -> int:
    """The rendezvous port of a job's attempt: the same on every node, different per requeue."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return PORT_BASE + (int(digits) * 4 + attempt % 4) % PORT_SPAN


def rendezvous_from_slurm(env: Mapping[str, str], scontrol: Scontrol = run_scontrol,
                          this_host: Optional[str] = None, master_addr: Optional[str] = None,
                          master_port: Optional[int] = None, resolve: Callable[[str], str] = _resolve
                          ) -> Rendezvous:
    """This node's place in the job, checked for consistency before any process starts."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise SlurmError("SLURM_JOB_ID is not set: run `ft launch --slurm` inside a Slurm allocation")
    nnodes = _int_var(env, "SLURM_NNODES")
    node_rank = _int_var(env, "SLURM_NODEID")
    attempt = int(env.get("SLURM_RESTART_COUNT") or 0)
    hosts = job_hosts(env, scontrol)
    if len(hosts) != nnodes:
        raise SlurmError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST')!r} names "
                         f"{len(hosts)} hosts ({', '.join(hosts[:8])})")
    if not 0 <= node_rank < nnodes:
        raise SlurmError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1} (SLURM_NNODES={nnodes})")
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and step_tasks.isdigit() and int(step_tasks) != nnodes:
        raise SlurmError(f"SLURM_STEP_NUM_TASKS={step_tasks} but SLURM_NNODES={nnodes}: `ft launch --slurm` starts "
                         "every process of its node itself; run exactly one task per node (srun --ntasks-per-node=1)")
    step_nodes = env.get("SLURM_STEP_NUM_NODES")
    if step_nodes is not None and step_nodes.isdigit() and int(step_nodes) != nnodes:
        raise SlurmError(f"SLURM_STEP_NUM_NODES={step_nodes} but SLURM_NNODES={nnodes}: the job step must span the "
                         "whole allocation")
    node_name = env.get("SLURMD_NODENAME")
    if node_name and node_name != hosts[node_rank]:
        raise SlurmError(f"SLURMD_NODENAME={node_name} but SLURM_NODEID={node_rank} is {hosts[node_rank]} in "
                         f"SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST')!r}")
    if master_addr is None:
        head = node_info(hosts[0], scontrol)
        master_addr = head.address
        ip = resolve(master_addr)
        if nnodes > 1 and _is_loopback(ip):
            me = (this_host or socket.gethostname()).split(".")[0]
            elsewhere = [h for h in hosts if node_info(h, scontrol).hostname.split(".")[0] != me]
            if elsewhere:
                raise SlurmError(
                    f"head node {hosts[0]} resolves to {ip} (loopback) in a {nnodes}-node allocation that spans "
                    f"other machines ({', '.join(elsewhere[:4])}): nodes would rendezvous with themselves and wait "
                    f"forever. Make {hosts[0]}'s name resolve to a routable address (/etc/hosts maps it to "
                    "127.0.x.x on many images) or pass --master-addr")
    port = master_port if master_port is not None else derive_port(job_id, attempt)
    return Rendezvous(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=port,
                      hosts=tuple(hosts), job_id=job_id, attempt=attempt)


# ---------------------------------------------------------------------------------------------- sbatch script
@dataclass(frozen=True)
class SbatchOptions(RunConfigArgs):
    """What `ft slurm` writes into the sbatch script."""
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    ft_command: tuple[str, ...]
    workdir: str
    log_dir: str
    job_name: str = "ft"
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    grace_s: int = 120
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)


def sbatch_directives(o: SbatchOptions) -> list[str]:
    """The #SBATCH lines for `o`."""
    if o.nodes < 1:
        raise SlurmError(f"--nodes must be >= 1, got {o.nodes}")
    if o.gpus_per_node < 0 or o.nproc_per_node < 1:
        raise SlurmError(f"--gpus-per-node must be >= 0 and --nproc-per-node >= 1 (got {o.gpus_per_node}, "
                         f"{o.nproc_per_node})")
    if o.grace_s < 1:
        raise SlurmError(f"--grace must be >= 1 second, got {o.grace_s}")
    options = [f"--job-name={o.job_name}", f"--nodes={o.nodes}", "--ntasks-per-node=1"]
    if o.gpus_per_node:
        options.append(f"--gpus-per-node={o.gpus_per_node}")
    for flag, value in (("partition", o.partition), ("time", o.time), ("account", o.account), ("qos", o.qos),
                        ("cpus-per-task", o.cpus_per_task), ("mem", o.mem)):
        if value is not None:
            options.append(f"--{flag}={value}")
    # Requeue on preemption; USR1 to the batch shell `grace` seconds before the time limit, so the job
    # checkpoints and requeues instead of being killed.
    options += ["--requeue", f"--signal=B:USR1@{o.grace_s}", f"--chdir={o.workdir}", "--open-mode=append",
                f"--output={o.log_dir}/slurm-%x-%j.out"]
    options += list(o.extra_sbatch)
    return [f"#SBATCH {shlex.quote(opt)}" for opt in options]


def render_sbatch(template: str, o: SbatchOptions) -> str:
    """The template with its #SBATCH block replaced by the options and its `@ft-slurm:` lines filled in."""
    directives = sbatch_directives(o)
    args = o.config_argv()
    fills = {
        "command": f"FT=({shlex.join(o.ft_command)})",
        "nproc": f"NPROC_PER_NODE={o.nproc_per_node}",
        "log_dir": f"LOG_DIR={shlex.quote(o.log_dir)}",
        "arguments": f"set -- {shlex.join(args)}" if args else "set --",
    }
    out: list[str] = []
    placed = False
    for line in template.splitlines():
        if line.startswith("#SBATCH"):
            if not placed:
                out.extend(directives)
                placed = True
            continue
        marker = line.rsplit("# @ft-slurm:", 1)
        if len(marker) == 2:
            key = marker[1].strip()
            if key not in fills:
                raise SlurmError(f"{TEMPLATE}: unknown marker @ft-slurm:{key}")
            out.append(fills.pop(key))
            continue
        out.append(line)
    if not placed or fills:
        raise SlurmError(f"{TEMPLATE}: template lacks the #SBATCH block or markers {sorted(fills)}")
    return "\n".join(out) + "\n"


def submit(script_path: Path, env: Mapping[str, str]) -> str:
    """sbatch the script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: run `ft slurm` on a Slurm login node (or use --dry-run)")
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True,
                          env=dict(env), timeout=120)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script_path} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip().split(";")[0]
