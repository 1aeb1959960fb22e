"""Shared test helpers. Training runs start real processes (accelerate launch, DeepSpeed, gloo): nothing mocked."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One built-in model cache for the whole session (built once, ~3 s), inherited by every launched process.
os.environ.setdefault("FT_CACHE_DIR", str(ROOT / ".pytest_cache" / "ft-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The test being run (set by the autouse fixture below): run_ft checks that a test which trains says so.
_current_test: list = [None]


@pytest.fixture(autouse=True)
def _remember_the_current_test(request):
    _current_test[0] = request.node
    yield
    _current_test[0] = None


TRAINING_COMMANDS = ("train", "launch")


def check_marked_trains(args: tuple[str, ...] | list[str], trains: bool = True) -> None:
    """A test that starts a training command must carry the `trains` marker, so `-m "not trains"` (make
    test-fast) is exactly the tests that train nothing. trains=False: the command is expected to fail before
    anything trains (a one-line config or data error through the real CLI)."""
    command = next((a for a in args if not a.startswith("-")), "")
    node = _current_test[0]
    if (trains and command in TRAINING_COMMANDS and "--dry-run" not in args and node is not None
            and node.get_closest_marker("trains") is None):
        raise AssertionError(f"{node.nodeid} runs `ft {command}` but is not marked `trains` (pytest.mark.trains)")


def run_ft(*args: str, timeout: int = 600, check: bool = True, env: Optional[dict] = None,
           env_remove: tuple[str, ...] = (), trains: bool = True) -> subprocess.CompletedProcess:
    """Run the real `ft` CLI in a subprocess (what a user types), capturing output. For tests of the process
    itself (training, launch, signals, exit codes, entry points); a command that neither trains nor launches runs
    in the test process with ft_in_process."""
    check_marked_trains(args, trains)
    environment = {k: v for k, v in (env or os.environ).items() if k not in env_remove}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=environment)
    if check and proc.returncode != 0:
        raise AssertionError(f"ft {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


_SIGNALS_A_COMMAND_MAY_TAKE = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ft_in_process(*args: str, check: bool = True, env_remove: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The same `ft` command run inside the test process (typer's CliRunner), for commands that neither train nor
    launch: the exit code and both streams are captured as run_ft's are, but torch, transformers and peft are
    imported once per test session instead of once per call (~8 s each on a 2-core machine). An exception the
    CLI does not turn into its one-line error shows up as a Traceback in stderr, as it would for a user. What a
    command may change in the process (environment, signal handlers and mask) is put back; a command that got as
    far as starting a process group or DeepSpeed's communication (the training runtime) fails the test: it belongs
    in run_ft. Tests that check the real process (entry point, signals, environment) use run_ft."""
    import traceback

    import torch.distributed as dist
    from typer.testing import CliRunner

    from launcher.cli import app

    saved_env = dict(os.environ)
    saved_deepspeed_backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    saved_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS_A_COMMAND_MAY_TAKE}
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        for name in env_remove:
            os.environ.pop(name, None)
        result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    started = (dist.is_available() and dist.is_initialized()) or (
        deepspeed_comm is not None and getattr(deepspeed_comm, "cdb", None) is not saved_deepspeed_backend)
    if started:
        if dist.is_initialized():
            dist.destroy_process_group()
        if deepspeed_comm is not None:
            deepspeed_comm.cdb = saved_deepspeed_backend
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # so the next test is not failed by this one
        raise AssertionError(f"ft {' '.join(args)} started a process group inside the test process: it trains, so "
                             f"the test runs it with run_ft and is marked `trains`")
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
            "--set", "train.micro_batch_size=4", "--set", "data.max_seq_len=64", "--set", "logging.every=1",
            "--set", "evaluation.every=4", "--set", "checkpoint.every_steps=4", "--set", "data.audit=true",
            "--set", "optimizer.warmup_steps=2", *extra]


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the code a training run executes (ftcore/, launcher/, ds_configs/, examples/): a cached run is
    only reused by the code that made it."""
    digest = hashlib.sha256()
    for folder in ("ftcore", "launcher", "ds_configs", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def config_of(args):
    """The resolved config of `ft train/launch ARGS` (a YAML path, if any, first; then --set overrides)."""
    from ftcore.config import load_config

    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    paths = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--set")]
    return load_config(paths[0] if paths else None, sets)


def without_output_dir(args: list[str]) -> tuple[str, ...]:
    """tiny_run_args-style args ([YAML, --set, output_dir=..., ...]) without the output dir (TrainingRuns sets it)."""
    return (args[0], *args[3:])


class TrainingRuns:
    """The test session's training runs, keyed by what makes a run what it is: the command and process count, the
    run's resolved config (every field but output_dir, after YAML + --set), the code fingerprint, and a variant
    label for the rare test that compares two runs of one config (e.g. a setting made explicit vs its default).
    Each distinct run happens once per session, whichever modules (and, under pytest-xdist, whichever workers) ask
    for it: the first takes the key's file lock and runs it, the others wait and reuse it. Its output dir is shared
    and must be treated as read-only (copy it to change it); its console output is kept in launch.log. The base
    dir belongs to this pytest run, so nothing is reused from an earlier one."""

    def __init__(self, base: Path):
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)

    def key(self, command: str, args: tuple[str, ...], nproc: int, variant: str) -> str:
        resolved = config_of(args).model_dump(mode="json")
        resolved.pop("output_dir", None)
        identity = json.dumps({"command": command, "nproc": nproc, "config": resolved, "variant": variant,
                               "code": code_fingerprint()}, sort_keys=True, default=str)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    def get(self, *args: str, nproc: int = 2, command: str = "launch", variant: str = "") -> tuple[Path, str]:
        """(output dir, console output) of `ft COMMAND ARGS --set output_dir=<cached> [--nproc N]`."""
        from filelock import FileLock

        key = self.key(command, args, nproc, variant)
        out, done = self.base / key, self.base / f"{key}.done"
        with FileLock(str(self.base / f"{key}.lock")):
            if not done.is_file():
                shutil.rmtree(out, ignore_errors=True)  # a run that failed in another worker is run again
                launch = ("--nproc", str(nproc)) if command == "launch" else ()
                proc = run_ft(command, *args, "--set", f"output_dir={out}", *launch)
                (out / "launch.log").write_text(proc.stdout + proc.stderr)
                done.touch()
            else:
                check_marked_trains((command,))  # reading a run counts as training it, for the marker
        return out, (out / "launch.log").read_text()


@pytest.fixture(scope="session")
def training_runs(tmp_path_factory) -> TrainingRuns:
    # Under pytest-xdist every worker has its own basetemp under one for the whole run: share that one.
    root = tmp_path_factory.getbasetemp()
    return TrainingRuns((root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "training-runs")


def tiny_args(*extra: str) -> tuple[str, ...]:
    """tiny_run_args without the output dir (TrainingRuns sets it)."""
    return without_output_dir(tiny_run_args(Path("unset"), *extra))


def cached_launches(runs: TrainingRuns, named: dict[str, tuple], *common: str, variants: dict[str, str] = None):
    """get(name): the output dir of a 2-process `ft launch` of tiny_run_args + common + named[name], from the
    session's TrainingRuns (started on first use by whichever test asks first)."""
    variants = variants or {}

    def get(name: str) -> Path:
        return runs.get(*tiny_args(*common, *named[name]), variant=variants.get(name, ""))[0]

    return get


@pytest.fixture(scope="session")
def builtin_model_dir() -> str:
    from ftcore.builtin import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


def plan_matches_engine(args: list[str], out: Path, world: int) -> None:
    """What `ft plan` predicts per rank (parameter storage, optimizer states) equals what DeepSpeed's engine held
    in the run started with `args` (recorded after its first step with data.audit)."""
    from ftcore.builtin import resolve_model_path
    from ftcore.tools.plan import build_facts, engine_state_bytes

    cfg = config_of(args)
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
                         "checkpoint.every_steps=100", "--set", "evaluation.every=0")


@pytest.fixture(scope="session")
def uninterrupted_run(training_runs) -> Path:
    """stoppable_run_args as one uninterrupted 2-process `ft launch`: what every interrupted run must equal."""
    return training_runs.get(*stoppable_args())[0]


def stoppable_args() -> tuple[str, ...]:
    return without_output_dir(stoppable_run_args(Path("unset")))


def assert_same_final_adapter(a: Path, b: Path) -> None:
    """Two runs' final adapters hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(out / "final" / "adapter_model.safetensors") for out in (a, b))
    assert x.keys() == y.keys() and x
    for name in x:
        assert torch.equal(x[name], y[name]), name


def pytest_collection_modifyitems(config, items):
    """Heaviest modules first (by their training tests, a real-model test counting 3): under pytest-xdist's
    loadscope each module runs whole on one worker, and a heavy module started last would leave the other worker
    idle at the end. Deterministic (every worker must collect the same order); within a module the order is
    kept."""
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        cost = 3 if item.get_closest_marker("realmodel") else 1 if item.get_closest_marker("trains") else 0
        weight[module] = weight.get(module, 0) + cost
    first_seen = {module: i for i, module in reversed(list(enumerate(item.nodeid.split("::")[0] for item in items)))}
    items.sort(key=lambda item: (-weight[item.nodeid.split("::")[0]], first_seen[item.nodeid.split("::")[0]]))
