"""`ft`: the command line. Each subcommand parses, validates, then dispatches; none imports torch unless it runs
training or generation.

    ft config examples/demo.yaml --set train.lr=1e-4       print the resolved config
    ft launch examples/demo.yaml --nproc 2                 train on this machine in 2 processes (DeepSpeed)
    ft launch examples/demo.yaml --nproc 2 --dry-run       print the launch command and exit
    ft slurm examples/demo.yaml --nodes 2 --gpus-per-node 8   submit a multi-node job (sbatch slurm/ft.sbatch)
    ft plan examples/llama-2-70b-qlora.yaml --gpus-per-node 2 --gpu-mem-gb 40   memory per GPU, before launching
    ft plot outputs/demo                                    loss, learning rate and tokens/s as a PNG
    ft train examples/demo.yaml                            train in the current process(es)
    ft generate --model outputs/demo/final --prompt "What is the capital of France?"
    ft data inspect examples/demo.yaml -n 3                show processed samples (trained tokens marked) + stats
    ft export --adapter outputs/demo/final --out outputs/demo/merged   merge LoRA into the base, shard by shard
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import List, Optional

import typer

from ftcore.config import ConfigError, dump_config, load_config
from ftcore.preflight import check_inputs

# Deprecations inside our dependencies (DeepSpeed's collectives, transformers' checkpointing alias), printed
# once per rank per step otherwise; they are not actionable by a user of ft.
for _pattern in (r".*all_gather_into_tensor.*", r".*reduce_scatter_tensor.*", r".*is_gradient_checkpointing.*"):
    warnings.filterwarnings("ignore", message=_pattern, category=FutureWarning)
# DeepSpeed steps the schedule right after the optimizer, but through a path torch's call counter does not see.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs with LoRA or full fine-tuning on accelerate + DeepSpeed.")

CONFIG_ARG = typer.Argument(None, help="YAML config (optional: defaults are the built-in demo).")
SET_OPT = typer.Option([], "--set", help="Override a field: --set train.lr=1e-4 (repeatable; wins over YAML).")
RESUME_OPT = typer.Option("auto", "--resume",
                          help="auto: newest complete checkpoint in output_dir; none: start fresh; or a step dir.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="On an error, print the Python traceback too "
                                        "(for a bug report); the training processes inherit it."),
             local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                                      help="Passed by the deepspeed launcher (which also sets "
                                                      "LOCAL_RANK, what ft reads).")) -> None:
    if debug:
        os.environ["FT_DEBUG"] = "1"


def _fail(message: str, code: int = 2) -> None:
    if os.environ.get("FT_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    label = "" if message.startswith("config error:") else "error: "
    print(f"{prefix}{label}{message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _load(config: Optional[str], sets: List[str], check_paths: bool = False, announce: bool = False):
    """The run's config: YAML + --set, then what the launcher (accelerate launch's settings) and a DeepSpeed JSON
    chose for the fields those leave unset (ftcore/launch_settings.py); announce prints those choices (rank 0)."""
    from ftcore.launch_settings import launcher_settings, process_rank

    try:
        cfg = load_config(config, sets)
        derived, lines = launcher_settings(cfg, os.environ)
        if derived:
            cfg = load_config(config, sets, derived)
        if announce and process_rank() == 0:
            for line in lines:
                print(line, flush=True)
        if check_paths:
            check_inputs(cfg)
        return cfg
    except ConfigError as e:
        _fail(str(e))


def _check_batch(cfg, world_size: int) -> None:
    from ftcore.preflight import check_batch

    try:
        check_batch(cfg, world_size)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def config(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT) -> None:
    """Print the resolved config (defaults < YAML < --set).

    Example: ft config examples/demo.yaml --set distributed.zero_stage=3
    """
    typer.echo(dump_config(_load(config, sets)), nl=False)


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
    from launcher.supervise import write_failure_record

    die_with_launcher()
    install_stop_handlers()  # first: a stop signal from now on is recorded, not fatal
    try:
        cfg = _load(config, sets, check_paths=True, announce=True)
        from ftcore.checkpoint import CheckpointError
        from ftcore.data.stream import DataError
        from ftcore.model import ModelError
        from ftcore.train import TrainError, run

        try:
            run(cfg, resume=resume)
        except Preempted:
            raise typer.Exit(PREEMPTED_EXIT_STATUS) from None  # rank 0 has logged where the checkpoint is
        except (ConfigError, DataError, ModelError, CheckpointError, TrainError) as e:
            write_failure_record(str(e))
            _fail(str(e), code=1)
        finally:
            ignore_stop_signals()  # the outcome is decided: a signal during teardown must not change it
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:  # an unexpected error still tells the launcher when and where it happened
        lost = _lost_peer(e)
        if lost:
            write_failure_record(lost)
            _fail(lost, code=1)
        write_failure_record(f"{type(e).__name__}: {e}")
        raise


def _lost_peer(error: Exception) -> Optional[str]:
    """A collective that failed because another rank died or hung, as one line (else None)."""
    text = str(error)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    if any(s in text for s in ("Timed out", "timed out", "Timeout", "Watchdog caught collective")):
        return (f"a collective timed out waiting for another rank (distributed.timeout_s): a peer hung or is far "
                f"behind; see which rank failed first ({first})")
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                               "NCCL communicator was aborted", "ProcessGroupGloo", "recvBytes")):
        return f"lost the connection to another rank in a collective (it died): {first}"
    return None


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
    from launcher.supervise import block_stop_signals

    if not dry_run:
        block_stop_signals()  # before anything can start a thread (see launcher/supervise.py)
    from pathlib import Path

    from ftcore.dist_env import free_port
    from launcher.slurm import SlurmError, rendezvous_from_slurm
    from launcher.supervise import NodeContext, run_node, say
    from launcher.workstation import LaunchSpec, build_command

    cfg = _load(config, sets, check_paths=True, announce=True)  # validate before starting anything
    if nproc < 1:
        _fail(f"--nproc must be >= 1, got {nproc}")
    cpus = None
    if slurm:
        if nnodes is not None or node_rank is not None:
            _fail("--slurm takes --nnodes and --node-rank from the allocation (SLURM_NNODES, SLURM_NODEID); "
                  "drop them")
        try:
            rdzv = rendezvous_from_slurm(os.environ, master_addr=master_addr, master_port=master_port)
        except SlurmError as e:
            _fail(f"ft launch --slurm: {e}")
        nnodes, node_rank, master_addr, master_port = rdzv.nnodes, rdzv.node_rank, rdzv.master_addr, \
            rdzv.master_port
        attempt = f"slurm-{rdzv.job_id}-attempt{rdzv.attempt}"
        cpus = int(os.environ["SLURM_CPUS_ON_NODE"]) if os.environ.get("SLURM_CPUS_ON_NODE", "").isdigit() else None
    else:
        nnodes = 1 if nnodes is None else nnodes
        node_rank = 0 if node_rank is None else node_rank
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            _fail(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
        if nnodes > 1 and (master_addr is None or master_port is None):
            _fail("--nnodes > 1 needs --master-addr (node 0's address, reachable from every node) and "
                  "--master-port (the same on every node)")
        master_addr = master_addr or "127.0.0.1"
        master_port = master_port or free_port()
        attempt = time.strftime("launch-%Y%m%d-%H%M%S") + f"-node{node_rank}"
    _check_batch(cfg, nproc * nnodes)
    attempt_dir = Path(cfg.output_dir).resolve() / "logs" / attempt
    # On a terminal the ranks keep it (live progress bar); otherwise (Slurm, nohup, CI) every rank's output goes
    # to its own log file too and each console line is prefixed with node and rank.
    tee = not sys.stdout.isatty()
    spec = LaunchSpec(config_path=config, overrides=tuple(sets), nproc=nproc,
                      zero_stage=cfg.distributed.zero_stage, mixed_precision=cfg.model.mixed_precision,
                      main_port=master_port, resume=resume, nnodes=nnodes, node_rank=node_rank,
                      master_addr=master_addr, cpus=cpus, log_dir=str(attempt_dir / f"node{node_rank}") if tee
                      else None, failure_dir=str(attempt_dir / "failures"))
    argv, env = build_command(spec, os.environ)
    if dry_run:
        import shlex

        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        typer.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())) + " " + shlex.join(argv))
        return
    from ftcore.builtin import resolve_model_path

    resolve_model_path(cfg.model.name_or_path)  # a built-in model is built once here, not raced by every rank
    ctx = NodeContext(node_rank=node_rank, nproc=nproc, attempt_dir=attempt_dir, tee=tee)
    if nnodes > 1:
        say(ctx, f"node {node_rank} of {nnodes}, {nproc} processes, rendezvous at {master_addr}:{master_port}")
    raise typer.Exit(run_node(argv, env, ctx))


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

    cfg = _load(config, sets, check_paths=True)
    _check_batch(cfg, nodes * (nproc_per_node or max(gpus_per_node, 1)))
    output_dir = Path(cfg.output_dir).resolve()
    log_dir = output_dir / "logs"
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
        _fail(f"ft slurm: {e}")
    if dry_run:
        typer.echo(script, nl=False)
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = log_dir / f"{options.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script_path.write_text(script)
    try:
        job_id = submit(script_path, os.environ)
    except SlurmError as e:
        _fail(f"ft slurm: {e}", code=1)
    typer.echo(f"submitted job {job_id} ({nodes} nodes x {options.nproc_per_node} processes): script "
               f"{script_path}")
    typer.echo(f"logs: {log_dir}/slurm-{options.job_name}-{job_id}.out (batch) and "
               f"{log_dir}/{options.job_name}-{job_id}-attempt<N>.log (one per attempt, lines prefixed "
               "[nodeK rankR])")


@app.command()
def generate(model: str = typer.Option(..., "--model", help="A final/ dir: PEFT adapter or full HF model."),
             prompt: List[str] = typer.Option(..., "--prompt", help="User message (repeatable)."),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens")) -> None:
    """Greedy generation from a fine-tuned model (base + adapter, or a full model), with its chat template.

    Example: ft generate --model outputs/demo/final --prompt "What is the capital of France?"
    """
    from ftcore.generate import generate as run_generate

    try:
        for p, answer in zip(prompt, run_generate(model, prompt, max_new_tokens)):
            typer.echo(f"user: {p}\nassistant: {answer}")
    except (OSError, ValueError) as e:
        _fail(str(e), code=1)


@app.command()
def export(adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir (e.g. final/)."),
           checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A training checkpoint step dir."),
           base: Optional[str] = typer.Option(None, "--base", help="Base model dir (default: from the run config "
                                              "or adapter_config.json)."),
           out: str = typer.Option(..., "--out", help="Output HF model dir (must not exist unless --force)."),
           dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (default: the "
                                               "base's)."),
           shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
           merge_base: str = typer.Option("auto", "--merge-base", help="auto | quantized | original: merge a QLoRA "
                                          "adapter onto dequant(NF4(W)) (auto when the run was qlora) or onto W."),
           verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare logits with the model as "
                                       "trained before the output is put in place."),
           force: bool = typer.Option(False, "--force", help="Replace an existing --out.")) -> None:
    """Merge or consolidate into a plain Hugging Face safetensors model, out of core; offline, CPU only.

    Examples: ft export --adapter outputs/demo/final --out outputs/demo/merged
              ft export --checkpoint outputs/run/checkpoints/step-000100 --out merged --dtype bfloat16
    """
    from pathlib import Path

    from ftcore.dtypes import DTYPES
    from ftcore.export.export import ExportError, export_adapter, export_checkpoint

    if (adapter is None) == (checkpoint is None):
        _fail("ft export: give exactly one of --adapter or --checkpoint")
    if dtype is not None and dtype not in DTYPES:
        _fail(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if merge_base not in ("auto", "quantized", "original"):
        _fail(f"--merge-base {merge_base}: expected auto, quantized or original")
    args = dict(out=Path(out), dtype=dtype, shard_size=shard_size, merge_base=merge_base, verify=verify,
                force=force, log=typer.echo)
    try:
        if adapter is not None:
            report = export_adapter(Path(adapter), base, **args)
        else:
            report = export_checkpoint(Path(checkpoint), base, **args)
    except (ExportError, OSError) as e:
        _fail(str(e), code=1)
    typer.echo(f"exported {report.tensors} tensors ({report.bytes / 1e6:.1f} MB; {report.merged} LoRA-merged, "
               f"{report.replaced} replaced; merge base: {report.merge_base}; verification: {report.verified}) "
               f"to {report.out}")


@app.command("plan")
def plan_memory(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
                gpus_per_node: int = typer.Option(..., "--gpus-per-node", help="GPUs (training processes) per node."),
                nodes: int = typer.Option(1, "--nodes"),
                gpu_mem_gb: Optional[float] = typer.Option(None, "--gpu-mem-gb", help="Memory per GPU in GiB: mark "
                                                           "what fits and recommend the cheapest layout."),
                as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Per-GPU memory for this config under ZeRO 0-3, with and without offload, before you launch. Builds the
    model on the meta device from its config.json: no weights needed.

    Example: ft plan examples/llama-2-70b-qlora.yaml --gpus-per-node 2 --gpu-mem-gb 40
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from ftcore.builtin import builtin_config_path, is_builtin
    from ftcore.plan import CUDA_OVERHEAD_BYTES, GIB, PlanError, build_facts, make_plan

    # The plan needs the model's config.json and the shapes of the batch, not the data: data paths that do not
    # exist yet (the usual case when planning) are not checked.
    from ftcore.preflight import check_combinations, check_model_path

    cfg = _load(config, sets)
    try:
        check_model_path(cfg.model.name_or_path)
        check_combinations(cfg)
    except ConfigError as e:
        _fail(str(e))
    name = cfg.model.name_or_path
    model_dir = str(builtin_config_path(name).parent) if is_builtin(name) else name
    try:
        plan = make_plan(cfg, build_facts(cfg, model_dir), gpus_per_node, nodes, gpu_mem_gb)
    except (PlanError, OSError, ValueError) as e:
        _fail(f"ft plan: {e}")
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=1))
        return
    gib = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    console.print(f"{name}: {plan.total_params / 1e9:.2f} B parameters, {plan.trainable_params / 1e6:.1f} M trainable"
                  + (f", {plan.quantized_params / 1e9:.2f} B in 4-bit NF4" if plan.quantized_params else "")
                  + f" | {cfg.adapter.method}, {cfg.model.dtype} | {plan.world} GPUs ({nodes} x {gpus_per_node}) | "
                  f"micro batch {cfg.train.micro_batch_size} x {cfg.data.max_seq_len} tokens")
    table = Table(title="per-GPU memory, GiB (model states exact; activations estimated; +"
                  f"{CUDA_OVERHEAD_BYTES / GIB:.0f} GiB CUDA overhead in totals)")
    for column in ("ZeRO", "offload", "weights", "4-bit base", "trainable", "grads", "optimizer", "model states",
                   "act. ckpt", "act. full", "total ckpt", "total full", "host RAM/node"):
        table.add_column(column, justify="right")
    for row in plan.rows:
        if not row.supported:
            table.add_row(str(row.stage), row.offload, *["-"] * 11)
            continue
        totals = []
        for checkpointing in (True, False):
            total = row.total(checkpointing)
            mark = "" if plan.gpu_mem_bytes is None else (" ✓" if total <= plan.gpu_mem_bytes else " ✗")
            totals.append(gib(total) + mark)
        table.add_row(str(row.stage), row.offload, gib(row.weights), gib(row.quantized_base),
                      gib(row.trainable_weights), gib(row.gradients), gib(row.optimizer), gib(row.model_states),
                      gib(row.activations_checkpointed), gib(row.activations_full), *totals,
                      gib(row.host_ram_per_node) if row.host_ram_per_node else "-")
    console.print(table)
    for row in plan.rows:
        if not row.supported:
            console.print(f"ZeRO-{row.stage} offload {row.offload}: {row.note}")
    if plan.gpu_mem_bytes is None:
        console.print("give --gpu-mem-gb to see what fits and which layout to use")
        return
    best = plan.recommendation
    if best is None:
        smallest = min((r for r in plan.rows if r.supported), key=lambda r: r.total(True))
        console.print(f"nothing fits in {gpu_mem_gb:g} GiB per GPU: the smallest is {gib(smallest.total(True))} GiB "
                      f"(ZeRO-{smallest.stage}, offload {smallest.offload}, checkpointing). Add GPUs, use "
                      "adapter.method=qlora, or lower train.micro_batch_size / data.max_seq_len.")
        return
    console.print(f"recommended: ZeRO-{best['zero_stage']}, offload {best['offload']}, gradient checkpointing "
                  f"{'on' if best['gradient_checkpointing'] else 'off'}: {gib(best['per_gpu_bytes'])} GiB per GPU of "
                  f"{gpu_mem_gb:g}" + (f", {gib(best['host_ram_per_node_bytes'])} GiB host RAM per node"
                                       if best["host_ram_per_node_bytes"] else ""))
    console.print("  " + " ".join(f"--set {o}" for o in best["overrides"]))


@app.command("plot")
def plot(run_dir: str = typer.Argument(..., help="A run's output_dir (holds metrics.jsonl)."),
         out: Optional[str] = typer.Option(None, "--out", help="PNG to write (default: RUN_DIR/metrics.png).")) -> None:
    """One PNG of a run: loss (train and eval), learning rate and tokens/s over steps.

    Example: ft plot outputs/demo --out demo.png
    """
    from pathlib import Path

    from ftcore.plot import PlotError, plot_run

    target = Path(out) if out else Path(run_dir) / "metrics.png"
    try:
        series = plot_run(Path(run_dir), target)
    except (PlotError, OSError) as e:
        _fail(f"ft plot: {e}", code=1)
    typer.echo(f"wrote {target} ({len(series['loss'])} steps"
               + (f", {len(series['eval_loss'])} evals" if "eval_loss" in series else "") + ")")


data_app = typer.Typer(no_args_is_help=True, help="Look at the training data as the model will see it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
                 show: int = typer.Option(3, "-n", "--show", help="Samples to print."),
                 scan: int = typer.Option(1000, "--scan", help="Samples to read for the statistics.")) -> None:
    """Show processed samples (trained tokens marked) and statistics of the first --scan samples in training
    order: samples, tokens, length histogram, share of trained tokens, packing efficiency, skipped/truncated.

    Example: ft data inspect examples/demo.yaml -n 2 --set data.max_seq_len=128
    """
    from rich.console import Console
    from rich.text import Text

    from ftcore.builtin import resolve_model_path
    from ftcore.data.inspect import inspect_data, length_histogram
    from ftcore.data.stream import DataError
    from ftcore.model import load_tokenizer

    cfg = _load(config, sets, check_paths=True)
    try:
        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
        result = inspect_data(cfg, tokenizer, show, scan)
    except (DataError, OSError, ValueError) as e:
        _fail(str(e), code=1)
    console = Console(soft_wrap=True)
    plain = not console.is_terminal or console.no_color
    # On a terminal trained tokens are green and masked ones dim; in plain output trained runs are in «».
    console.print(("legend: «trained tokens» masked tokens" if plain else
                   Text.assemble("legend: ", ("trained tokens", "bold green"), " ", ("masked tokens", "dim"))))
    for sample_id, runs in result.shown:
        console.rule(sample_id)
        text = Text()
        for piece, trained in runs:
            if plain:
                text.append(f"«{piece}»" if trained else piece)
            else:
                text.append(piece, style="bold green" if trained else "dim")
        console.print(text)
    c, n = result.counters, len(result.lengths)
    tokens, trained = sum(result.lengths), sum(result.trained)
    console.rule("statistics")
    for path, records, files in result.sources:
        console.print(f"source {path}: {records:,} records in {files} file{'s' if files > 1 else ''}")
    console.print(f"samples scanned: {n:,} (from {c['records']:,} records, in training order)")
    console.print(f"tokens: {tokens:,} (mean {tokens / max(n, 1):.1f}, max {max(result.lengths, default=0)}); "
                  f"trained: {trained:,} ({trained / max(tokens, 1):.1%})")
    console.print(f"truncated: {c['truncated']}, dropped (too long): {c['dropped_too_long']}, split: "
                  f"{c['split_records']} records into {c['split_pieces']} pieces, skipped (malformed): "
                  f"{c['skipped_errors']}, skipped (nothing to train): {c['skipped_no_trained_tokens']}")
    console.print(f"packing efficiency at max_seq_len {cfg.data.max_seq_len}: {result.packing_efficiency:.3f} "
                  f"({result.packing_rows} rows; data.packing is {'on' if cfg.data.packing else 'off'})")
    console.print(f"length histogram (tokens, max_seq_len {cfg.data.max_seq_len}):")
    for line in length_histogram(result.lengths, cfg.data.max_seq_len):
        console.print("  " + line)
    for example in result.error_examples:
        console.print(f"skipped: {example}")


def main() -> None:
    """The `ft` console script."""
    app()


if __name__ == "__main__":
    main()
