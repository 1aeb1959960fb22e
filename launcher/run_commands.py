"""The commands that train: `ft config` (the resolved config), `ft train` (in the processes a launcher started),
`ft launch` (this machine or this node, through accelerate + DeepSpeed) and `ft slurm` (submit a job)."""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import typer

from ftcore.config import ConfigError, dump_config
from ftcore.run_dir import RunDir
from launcher.app import (
    CONFIG_ARG,
    RESUME_OPT,
    SET_OPT,
    app,
    check_batch,
    fail,
    fail_rank,
    load_run_config,
    record_unexpected,
)


@app.command()
def config(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT) -> None:
    """Print the resolved config (defaults < YAML < --set).

    Example: ft config examples/demo.yaml --set distributed.zero_stage=3
    """
    typer.echo(dump_config(load_run_config(config, sets)), nl=False)


@app.command()
def train(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT, resume: str = RESUME_OPT) -> None:
    """Run the training recipe in the process(es) this was started in (python, torchrun, accelerate launch,
    deepspeed, srun). Settings accelerate launch or a DeepSpeed JSON chose fill the fields the config leaves unset.

    Exit status: 0 finished; 75 checkpointed on SIGUSR1/SIGTERM (rerun to resume); 1 failed; 2 bad config.

    Examples: torchrun --nproc-per-node 2 -m launcher.cli train examples/demo.yaml
              accelerate launch --config_file acc.yaml -m launcher.cli train examples/demo.yaml
              deepspeed --num_gpus 2 --module launcher.cli train examples/demo.yaml
    """
    from ftcore.preemption import (
        PREEMPTED_EXIT_STATUS,
        Preempted,
        die_with_launcher,
        ignore_stop_signals,
        install_stop_handlers,
    )
    die_with_launcher()
    _run_the_world_accelerate_asked_for(config, sets, resume)
    install_stop_handlers()  # first: a stop signal from now on is recorded, not fatal
    try:
        cfg = load_run_config(config, sets, check_paths=True, announce=True)
        from ftcore.checkpoint import CheckpointError
        from ftcore.data.stream import DataError
        from ftcore.model import ModelError
        from ftcore.train import TrainError, run

        try:
            run(cfg, resume=resume)
        except Preempted:
            raise typer.Exit(PREEMPTED_EXIT_STATUS) from None  # rank 0 has logged where the checkpoint is
        except (ConfigError, DataError, ModelError, CheckpointError, TrainError) as e:
            fail_rank(e)
        finally:
            ignore_stop_signals()  # the outcome is decided: a signal during teardown must not change it
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:  # an unexpected error still tells the launcher when and where it happened
        record_unexpected(e)
        raise


@app.command()
def launch(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
           nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) on this node."),
           nnodes: Optional[int] = typer.Option(None, "--nnodes", help="Nodes in the job (multi-node without "
                                                "Slurm: start ft launch on every node with its --node-rank)."),
           node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank, 0..nnodes-1."),
           master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0, reachable "
                                                     "from every node."),
           master_port: Optional[int] = typer.Option(None, "--master-port", "--port",
                                                     help="Rendezvous port on node 0 (default: a free one when "
                                                     "single-node; derived from the job id under --slurm)."),
           slurm: bool = typer.Option(False, "--slurm", help="Take node count, node rank, head node and port from "
                                      "the Slurm allocation (one srun task per node; slurm/ft.sbatch does this)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and environment, run nothing."),
           resume: str = RESUME_OPT) -> None:
    """Launch training on this machine (or this node of a multi-node job) with accelerate + DeepSpeed.

    Exit status: 0 finished; 75 checkpointed on SIGUSR1/SIGTERM (rerun to resume); 1 failed (the first failing
    rank and the tail of its log are printed); 2 bad arguments or config.

    Examples: ft launch examples/demo.yaml --nproc 2 --set train.max_steps=50
              ft launch cfg.yaml --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
    """
    from launcher.supervise import NodeContext, block_stop_signals, run_node, say

    if not dry_run:
        block_stop_signals()  # before anything can start a thread (see launcher/supervise.py)
    from pathlib import Path

    from launcher.topology import TopologyError, resolve_topology
    from launcher.workstation import LaunchSpec, build_command

    cfg = load_run_config(config, sets, check_paths=True, announce=True)  # validate before starting anything
    if nproc < 1:
        fail(f"--nproc must be >= 1, got {nproc}")
    try:
        node = resolve_topology(os.environ, slurm, nnodes, node_rank, master_addr, master_port)
    except TopologyError as e:
        fail(e)
    check_batch(cfg, nproc * node.nnodes)
    attempt_dir = RunDir(Path(cfg.output_dir).resolve()).attempt(node.attempt)
    # On a terminal the ranks keep it (live progress bar); otherwise (Slurm, nohup, CI) every rank's output goes
    # to its own log file too and each console line is prefixed with node and rank.
    tee = not sys.stdout.isatty()
    spec = LaunchSpec(config_path=config, overrides=tuple(sets), nproc=nproc,
                      zero_stage=cfg.distributed.zero_stage, mixed_precision=cfg.model.mixed_precision,
                      main_port=node.master_port, resume=resume, nnodes=node.nnodes, node_rank=node.node_rank,
                      master_addr=node.master_addr, cpus=node.cpus,
                      log_dir=str(attempt_dir / f"node{node.node_rank}") if tee else None,
                      failure_dir=str(attempt_dir / "failures"))
    argv, env = build_command(spec, os.environ)
    if dry_run:
        typer.echo(_command_line(argv, env))
        return
    from ftcore.builtin import resolve_model_path

    # A built-in model is built, a GGUF dequantized, once here: not raced by every rank.
    resolve_model_path(cfg.model.name_or_path, cfg.model.dtype)
    ctx = NodeContext(node_rank=node.node_rank, nproc=nproc, attempt_dir=attempt_dir, tee=tee,
                      stop_grace_s=cfg.distributed.stop_grace_s)
    if node.nnodes > 1:
        say(ctx, f"node {node.node_rank} of {node.nnodes}, {nproc} processes, rendezvous at "
                 f"{node.master_addr}:{node.master_port}")
    raise typer.Exit(run_node(argv, env, ctx))


def _run_the_world_accelerate_asked_for(config: Optional[str], sets: List[str], resume: str) -> None:
    """`accelerate launch --cpu --num_processes N` (or a MULTI_CPU config) runs accelerate's one-process launcher:
    one process, told nothing of the other N - 1. That process starts the world asked for itself, as `ft launch
    CONFIG --nproc N` would (same rendezvous, supervision and exit status), and exits with its status. When the
    request cannot be read, or spans several machines, the recipe refuses in one line (check_process_count)."""
    import psutil

    from ftcore.launch_settings import accelerate_asked_world, one_process_of_more

    if not one_process_of_more(os.environ) or config is None:
        return
    try:
        parent = psutil.Process().parent().cmdline()
        at = next(i for i, a in enumerate(parent) if a == "launch" and "accelerate" in " ".join(parent[:i]))
        nproc, machines = accelerate_asked_world(parent[at + 1:])
    except (StopIteration, psutil.Error, SystemExit, ValueError, IndexError, OSError):
        return  # the recipe's one-line refusal explains what to run instead
    if nproc < 2 or machines != 1 or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return
    import subprocess

    typer.echo(f"accelerate launch started 1 process for num_processes={nproc} (its one-process launcher): it "
               f"starts the {nproc} as `ft launch {config} --nproc {nproc}` would", err=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("MASTER_ADDR", "MASTER_PORT", "KMP_AFFINITY",
                                                              "KMP_BLOCKTIME")}
    argv = [sys.executable, "-m", "launcher.cli", "launch", config, *(w for s in sets for w in ("--set", s)),
            "--nproc", str(nproc), "--resume", resume]
    raise typer.Exit(subprocess.run(argv, env=env).returncode)


def _command_line(argv: list[str], env: dict[str, str]) -> str:
    """The launch as a shell line: the environment it changes, then the command."""
    import shlex

    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())) + " " + shlex.join(argv)


@app.command("slurm")
def slurm_submit(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
                 nodes: int = typer.Option(..., "--nodes", help="Nodes to allocate."),
                 gpus_per_node: int = typer.Option(..., "--gpus-per-node", help="GPUs per node (0: CPU only)."),
                 nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node",
                                                              help="Training processes per node (default: "
                                                              "--gpus-per-node, or 1 without GPUs)."),
                 partition: Optional[str] = typer.Option(None, "--partition"),
                 time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm time limit, e.g. 24:00:00."),
                 account: Optional[str] = typer.Option(None, "--account"),
                 qos: Optional[str] = typer.Option(None, "--qos"),
                 cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task"),
                 mem: Optional[str] = typer.Option(None, "--mem", help="Memory per node, e.g. 500G."),
                 grace: int = typer.Option(120, "--grace", help="Seconds before the time limit at which Slurm "
                                           "sends USR1: the run checkpoints and requeues."),
                 job_name: Optional[str] = typer.Option(None, "--job-name", help="Default: the config's name."),
                 extra_sbatch: str = typer.Option("", "--extra-sbatch", help='More sbatch options, e.g. '
                                                  '"--exclusive --constraint=h100".'),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Print the sbatch script, submit nothing."),
                 ) -> None:
    """Submit a multi-node training job: renders slurm/ft.sbatch with these options and runs sbatch.

    Example: ft slurm examples/demo.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00
    """
    import shlex
    from pathlib import Path

    from launcher.slurm import TEMPLATE, SbatchOptions, SlurmError, render_sbatch, submit

    cfg = load_run_config(config, sets, check_paths=True)
    check_batch(cfg, nodes * (nproc_per_node or max(gpus_per_node, 1)))
    output_dir = Path(cfg.output_dir).resolve()
    log_dir = RunDir(output_dir).logs
    try:
        options = SbatchOptions(
            config_path=config, overrides=tuple(sets), nodes=nodes, gpus_per_node=gpus_per_node,
            nproc_per_node=nproc_per_node or max(gpus_per_node, 1),
            ft_command=(sys.executable, "-m", "launcher.cli"), workdir=os.getcwd(), log_dir=str(log_dir),
            job_name=job_name or (Path(config).stem if config else "ft"), partition=partition, time=time_limit,
            account=account, qos=qos, cpus_per_task=cpus_per_task, mem=mem, grace_s=grace,
            extra_sbatch=tuple(shlex.split(extra_sbatch)))
        script = render_sbatch(TEMPLATE.read_text(), options)
    except (SlurmError, ValueError) as e:
        fail(f"ft slurm: {e}")
    if dry_run:
        typer.echo(script, nl=False)
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = log_dir / f"{options.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script_path.write_text(script)
    try:
        job_id = submit(script_path, os.environ)
    except SlurmError as e:
        fail(f"ft slurm: {e}", code=1)
    typer.echo(f"submitted job {job_id} ({nodes} nodes x {options.nproc_per_node} processes): script "
               f"{script_path}")
    typer.echo(f"logs: {log_dir}/slurm-{options.job_name}-{job_id}.out (batch) and "
               f"{log_dir}/{options.job_name}-{job_id}-attempt<N>.log (one per attempt, lines prefixed "
               "[nodeK rankR])")
