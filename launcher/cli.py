"""`ft`: the command line. Each subcommand parses, validates, then dispatches; none imports torch unless it runs
training or generation.

    ft config examples/demo.yaml --set train.lr=1e-4       print the resolved config
    ft launch examples/demo.yaml --nproc 2                 train on this machine in 2 processes (DeepSpeed)
    ft launch examples/demo.yaml --nproc 2 --dry-run       print the launch command and exit
    ft train examples/demo.yaml                            train in the current process(es)
    ft generate --model outputs/demo/final --prompt "What is the capital of France?"
    ft data inspect examples/demo.yaml -n 3                show processed samples (trained tokens marked) + stats
    ft export --adapter outputs/demo/final --out outputs/demo/merged   merge LoRA into the base, shard by shard
"""

from __future__ import annotations

import os
import sys
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


def _fail(message: str, code: int = 2) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    label = "" if message.startswith("config error:") else "error: "
    print(f"{prefix}{label}{message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _load(config: Optional[str], sets: List[str], check_paths: bool = False):
    try:
        cfg = load_config(config, sets)
        if check_paths:
            check_inputs(cfg)
        return cfg
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
    """Run the training recipe in the process(es) this was started in (python, torchrun, accelerate, srun).

    Example: torchrun --nproc-per-node 2 -m launcher.cli train examples/demo.yaml
    """
    cfg = _load(config, sets, check_paths=True)
    from ftcore.checkpoint import CheckpointError
    from ftcore.data.stream import DataError
    from ftcore.model import ModelError
    from ftcore.train import TrainError, run

    try:
        run(cfg, resume=resume)
    except (ConfigError, DataError, ModelError, CheckpointError, TrainError) as e:
        _fail(str(e), code=1)


@app.command()
def launch(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
           nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) on this machine."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and environment, run nothing."),
           port: Optional[int] = typer.Option(None, "--port", help="Rendezvous port (default: a free one)."),
           resume: str = RESUME_OPT) -> None:
    """Launch training on this workstation with accelerate + DeepSpeed in --nproc processes.

    Example: ft launch examples/demo.yaml --nproc 2 --set train.max_steps=50
    """
    from ftcore.dist_env import free_port
    from launcher.workstation import LaunchSpec, build_command, run

    cfg = _load(config, sets, check_paths=True)  # validate before starting anything
    if nproc < 1:
        _fail(f"--nproc must be >= 1, got {nproc}")
    spec = LaunchSpec(config_path=config, overrides=tuple(sets), nproc=nproc,
                      zero_stage=cfg.distributed.zero_stage,
                      mixed_precision=cfg.model.mixed_precision,
                      main_port=port or free_port(), resume=resume)
    argv, env = build_command(spec, os.environ)
    if not dry_run:
        from ftcore.builtin import resolve_model_path

        resolve_model_path(cfg.model.name_or_path)  # a built-in model is built once here, not raced by every rank
    if dry_run:
        import shlex

        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        typer.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())) + " " + shlex.join(argv))
        return
    raise typer.Exit(run(argv, env))


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

    from ftcore.export.export import DTYPES, ExportError, export_adapter, export_checkpoint

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
    app()


if __name__ == "__main__":
    main()
