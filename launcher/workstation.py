"""One node's launch: `ft launch CONFIG --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]`
-> `accelerate launch` of `ft train` in N processes (torch elastic's static rendezvous at A:P across M nodes).

`build_command` is pure (argv, env) -> tests check it without starting anything; `launcher/supervise.py` runs
it. The launched processes receive the same config path and --set overrides; the recipe derives the DeepSpeed
config from them (accelerate's --use_deepspeed only makes it start one process per rank under DeepSpeed).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class RunConfigArgs:
    """The run's config as the user gave it: a YAML path (or none: the built-in default) and --set overrides,
    passed on unchanged to every process a launcher starts."""
    config_path: Optional[str]
    overrides: tuple[str, ...]

    def config_argv(self) -> list[str]:
        """`[CONFIG] --set K=V ...` as `ft train` takes them."""
        return ([self.config_path] if self.config_path else []) + [w for s in self.overrides for w in ("--set", s)]


@dataclass(frozen=True)
class LaunchSpec(RunConfigArgs):
    """What `ft launch` was asked on a workstation."""
    nproc: int
    zero_stage: int
    mixed_precision: str  # no | bf16 | fp16
    main_port: int
    resume: str = "auto"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    cpus: Optional[int] = None          # cores this node may use (default: all of the machine's)
    log_dir: Optional[str] = None       # per-rank log files here, console lines prefixed "[nodeK rankR]"
    failure_dir: Optional[str] = None   # where failing ranks record when and why (launcher/supervise.py)


def build_command(spec: LaunchSpec, base_env: Mapping[str, str], python: str = sys.executable,
                  entry: Optional[Sequence[str]] = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the accelerate launch that runs `spec`: `ft train` in every process, or the ft command
    `entry` (its argv after `ft`); pure."""
    if spec.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {spec.nproc}")
    argv = [
        python, "-m", "accelerate.commands.launch",
        "--num_processes", str(spec.nproc * spec.nnodes),
        "--num_machines", str(spec.nnodes),
        "--machine_rank", str(spec.node_rank),
        "--main_process_ip", spec.master_addr,
        "--main_process_port", str(spec.main_port),
        "--use_deepspeed",
        "--zero_stage", str(spec.zero_stage),
        "--mixed_precision", spec.mixed_precision,
        "--dynamo_backend", "no",
    ]
    if spec.nnodes > 1:  # torchrun-style rendezvous on every node, not DeepSpeed's pdsh/ssh launcher
        argv += ["--deepspeed_multinode_launcher", "standard"]
    if spec.log_dir:
        argv += ["--tee", "3", "--log_dir", spec.log_dir]
    if entry is None:
        entry = ["train", *spec.config_argv(), "--resume", spec.resume]
    argv += ["--module", "launcher.cli", *entry]
    env = dict(base_env)
    # One intra-op thread pool per process would oversubscribe the cores N-fold; torchrun's default is 1 and
    # we keep a user's explicit choice.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (spec.cpus or os.cpu_count() or 1) // spec.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["FT_LAUNCHER"] = "ft"  # accelerate's settings here come from the ft config: nothing to reconcile
    if spec.log_dir:
        env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = f"[node{spec.node_rank} rank${{rank}}] "
    if spec.failure_dir:
        env["FT_FAILURE_DIR"] = spec.failure_dir
    # The agent (ft launch) takes TERM itself and asks the ranks to checkpoint (launcher/supervise.py); torch
    # elastic's own TERM handling would kill them after 30 s, mid-checkpoint.
    env["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    return argv, env


@dataclass(frozen=True)
class EvalRequest:
    """What `ft eval` was asked, as every rank of `ft eval --nproc N` receives it."""
    target: str
    data: tuple[str, ...] = ()
    fmt: Optional[str] = None
    metrics: tuple[str, ...] = ()
    out: Optional[str] = None
    batch_size: int = 8
    max_new_tokens: int = 64
    zero3: bool = False
    overrides: tuple[str, ...] = ()
    rewards: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """`eval TARGET --data ... --set ...` as `ft eval` takes them (without --nproc: a rank starts none)."""
        argv = ["eval", self.target, *(w for d in self.data for w in ("--data", d))]
        argv += ["--format", self.fmt] if self.fmt else []
        argv += [w for m in self.metrics for w in ("--metric", m)]
        argv += [w for r in self.rewards for w in ("--reward", r)]
        argv += ["--out", self.out] if self.out else []
        argv += ["--batch-size", str(self.batch_size), "--max-new-tokens", str(self.max_new_tokens)]
        argv += ["--zero3"] if self.zero3 else []
        return argv + [w for s in self.overrides for w in ("--set", s)]


def build_eval_command(request: EvalRequest, nproc: int, port: int, base_env: Mapping[str, str],
                       log_dir: Optional[str] = None, failure_dir: Optional[str] = None,
                       python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `ft eval --nproc N`: the same accelerate + DeepSpeed launch as training (build_command)
    starts N local ranks of `ft eval`; pure."""
    if nproc < 2:
        raise ValueError(f"--nproc must be >= 2 to start ranks, got {nproc}")
    spec = LaunchSpec(config_path=None, overrides=request.overrides, nproc=nproc,
                      zero_stage=3 if request.zero3 else 0, mixed_precision="no", main_port=port, log_dir=log_dir,
                      failure_dir=failure_dir)
    return build_command(spec, base_env, python, entry=request.argv())
