"""The `ft` typer app and what every command shares: the global --debug option, the one-line failure (`fail`),
reading the config with what the launcher and a DeepSpeed JSON derived (`load_run_config`), the batch check.
Commands live in run_commands.py (config, train, launch, slurm) and tool_commands.py (the offline tools)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional, Union

import typer

from ftcore.config import ConfigError, load_config
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
SET_OPT = typer.Option([], "--set", help="Override a field: --set optimizer.lr=1e-4 (repeatable; wins over YAML).")
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


def error_line(error: Union[str, BaseException]) -> str:
    """The one line a failure prints: a ConfigError's label by its type ("config error: ..."), "error: ..." else."""
    label = error.label if isinstance(error, ConfigError) else "error"
    return f"{label}: {error}"


def fail(error: Union[str, BaseException], code: int = 2) -> None:
    """Print `error` as the command's one error line (error_line; with the traceback under --debug) and exit with
    `code`."""
    if os.environ.get("FT_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    print(f"{prefix}{error_line(error)}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def fail_rank(error: BaseException) -> None:
    """A rank's known error: recorded for its launcher's first-failure report ("rank N failed first: <reason>",
    a config error keeping its label), then printed as one line; exit status 1."""
    from launcher.supervise import write_failure_record

    write_failure_record(error_line(error) if isinstance(error, ConfigError) and error.label != "error"
                         else str(error))
    fail(error, code=1)


def record_unexpected(error: BaseException) -> None:
    """A rank's unexpected error: a collective that lost its peer ends as one line (exit status 1); anything
    else is recorded for the launcher's report, and the caller re-raises it with its traceback."""
    from launcher.supervise import lost_peer_message, write_failure_record

    lost = lost_peer_message(error)
    write_failure_record(lost or f"{type(error).__name__}: {error}")
    if lost:
        fail(lost, code=1)


def load_run_config(config: Optional[str], sets: List[str], check_paths: bool = False, announce: bool = False):
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
        if process_rank() == 0:
            for old, new, where in cfg.renamed_fields():
                print(f"note: {where}: {old} is now {new} (the old name is read until the next release)",
                      file=sys.stderr, flush=True)
        if check_paths:
            check_inputs(cfg)
        return cfg
    except ConfigError as e:
        fail(e)


def check_batch(cfg, world_size: int) -> None:
    """The sequence groups and the effective batch work for `world_size` processes, else one line."""
    from ftcore.preflight import check_batch, check_sequence_parallel

    try:
        check_sequence_parallel(cfg, world_size)
        check_batch(cfg, world_size)
    except ConfigError as e:
        fail(e)


