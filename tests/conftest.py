"""Shared test helpers. Training runs start real processes (accelerate launch, DeepSpeed, gloo): nothing mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One built-in model cache for the whole session (built once, ~3 s), inherited by every launched process.
os.environ.setdefault("FT_CACHE_DIR", str(ROOT / ".pytest_cache" / "ft-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_ft(*args: str, timeout: int = 600, check: bool = True, env: Optional[dict] = None,
           env_remove: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the real `ft` CLI in a subprocess (what a user types), capturing output."""
    environment = {k: v for k, v in (env or os.environ).items() if k not in env_remove}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=environment)
    if check and proc.returncode != 0:
        raise AssertionError(f"ft {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def ft_in_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The same `ft` command run inside the test process (typer's CliRunner), for commands that neither train nor
    launch: the exit code and both streams are captured as run_ft's are, but torch, transformers and peft are
    imported once per test session instead of once per call (~8 s each on a 2-core machine). An exception the
    CLI does not turn into its one-line error shows up as a Traceback in stderr, as it would for a user. Tests
    that check the real process (entry point, signals, environment) use run_ft."""
    import traceback

    from typer.testing import CliRunner

    from launcher.cli import app

    saved_env = dict(os.environ)
    try:
        result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    proc = subprocess.CompletedProcess(["ft", *args], result.exit_code, result.stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"ft {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_run_args(output_dir: Path, *extra: str) -> list[str]:
    """A small, fast training config on the built-in model/data (fp32: resumed losses must be exact)."""
    return ["examples/chat-demo.yaml", "--set", f"output_dir={output_dir}", "--set", "train.max_steps=8",
            "--set", "train.micro_batch_size=4", "--set", "data.max_seq_len=64", "--set", "train.log_every=1",
            "--set", "train.eval_every=4", "--set", "checkpoint.every_steps=4", "--set", "data.audit=true",
            "--set", "train.warmup_steps=2", *extra]


def cached_launches(base: Path, runs: dict[str, tuple], *common: str):
    """get(name): the output dir of a 2-process `ft launch` of tiny_run_args + common + runs[name], started on
    first use and shared by a module's tests; its output is kept in launch.log."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = base / name
            proc = run_ft("launch", *tiny_run_args(out, *common, *runs[name]), "--nproc", "2")
            (out / "launch.log").write_text(proc.stdout + proc.stderr)
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="session")
def builtin_model_dir() -> str:
    from ftcore.builtin import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


def plan_matches_engine(args: list[str], out: Path, world: int) -> None:
    """What `ft plan` predicts per rank (parameter storage, optimizer states) equals what DeepSpeed's engine held
    in the run started with `args` (recorded after its first step with data.audit)."""
    from ftcore.builtin import resolve_model_path
    from ftcore.config import load_config
    from ftcore.plan import build_facts, engine_state_bytes

    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(args[0], sets)
    facts = build_facts(cfg, resolve_model_path(cfg.model.name_or_path))
    predicted = engine_state_bytes(cfg, facts, cfg.distributed.zero_stage, world)
    for rank in range(world):
        held = json.loads((out / "audit" / f"rank{rank}_memory.json").read_text())
        assert (held["param_bytes"], held["optimizer_bytes"]) == (predicted["param_bytes"],
                                                                  predicted["optimizer_bytes"]), (rank, held, predicted)


# A run long enough to be signalled mid-way (preemption tests, on a workstation and on Slurm).
STOPPABLE_STEPS = 24


def stoppable_run_args(output_dir: Path) -> list[str]:
    return tiny_run_args(output_dir, "--set", f"train.max_steps={STOPPABLE_STEPS}", "--set",
                         "checkpoint.every_steps=100", "--set", "train.eval_every=0")


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory) -> Path:
    """stoppable_run_args as one uninterrupted 2-process `ft launch`: what every interrupted run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ft("launch", *stoppable_run_args(out), "--nproc", "2")
    return out


def assert_same_final_adapter(a: Path, b: Path) -> None:
    """Two runs' final adapters hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(out / "final" / "adapter_model.safetensors") for out in (a, b))
    assert x.keys() == y.keys() and x
    for name in x:
        assert torch.equal(x[name], y[name]), name
