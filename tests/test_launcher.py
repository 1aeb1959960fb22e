"""The workstation launcher is a pure (argv, env) builder; --dry-run prints exactly that."""

import shlex
import subprocess
import sys

import pytest

from launcher.workstation import EvalRequest, LaunchSpec, build_command, build_eval_command
from tests.conftest import ROOT, run_ft


def test_build_command_is_pure_and_complete():
    spec = LaunchSpec(config_path="examples/chat-demo.yaml", overrides=("optimizer.lr=1e-4", "output_dir=/x y"),
                      nproc=4,
                      zero_stage=3, mixed_precision="bf16", main_port=29511)
    argv, env = build_command(spec, {"PATH": "/bin"}, python="/py")
    assert argv == build_command(spec, {"PATH": "/bin"}, python="/py")[0]
    head = argv[: argv.index("--module")]
    assert head[:3] == ["/py", "-m", "accelerate.commands.launch"]
    def flag(name):
        return head[head.index(name) + 1]

    flags = {name: flag(name) for name in ("--num_processes", "--main_process_port", "--zero_stage",
                                           "--mixed_precision")}
    assert flags["--num_processes"] == "4" and flags["--main_process_port"] == "29511"
    assert flags["--zero_stage"] == "3" and flags["--mixed_precision"] == "bf16"
    assert "--use_deepspeed" in argv
    tail = argv[argv.index("--module") + 1:]
    assert tail == ["launcher.cli", "train", "examples/chat-demo.yaml", "--set", "optimizer.lr=1e-4",
                    "--set", "output_dir=/x y", "--resume", "auto"]
    assert env["PATH"] == "/bin" and int(env["OMP_NUM_THREADS"]) >= 1
    assert build_command(spec, {"OMP_NUM_THREADS": "7"})[1]["OMP_NUM_THREADS"] == "7"  # user's choice kept


def test_eval_ranks_start_under_the_same_launch_as_training():
    """`ft eval --nproc N` is the training's accelerate + DeepSpeed launch (build_command) of `ft eval` with every
    option the user gave, rebuilt from the parsed request (no --nproc: a rank starts none)."""
    request = EvalRequest("out/run.yaml", data=("a.jsonl", "b c.jsonl"), fmt="chat", metrics=("exact_match",),
                          out="/tmp/ev", batch_size=3, max_new_tokens=9, zero3=True,
                          overrides=("distributed.timeout_s=60",))
    argv, env = build_eval_command(request, 2, 29512, {"PATH": "/bin"}, failure_dir="/f", python="/py")
    train_argv, _ = build_command(LaunchSpec(config_path=None, overrides=(), nproc=2, zero_stage=3,
                                             mixed_precision="no", main_port=29512), {}, python="/py")
    head = argv[: argv.index("--module")]
    assert head == train_argv[: train_argv.index("--module")]
    assert argv[argv.index("--module") + 1:] == [
        "launcher.cli", "eval", "out/run.yaml", "--data", "a.jsonl", "--data", "b c.jsonl", "--format", "chat",
        "--metric", "exact_match", "--out", "/tmp/ev", "--batch-size", "3", "--max-new-tokens", "9", "--zero3",
        "--set", "distributed.timeout_s=60"]
    assert env["FT_FAILURE_DIR"] == "/f" and env["PATH"] == "/bin"
    plain = build_eval_command(EvalRequest("builtin:tiny-llama"), 2, 1, {})[0]
    assert plain[plain.index("--zero_stage") + 1] == "0" and "--zero3" not in plain
    with pytest.raises(ValueError, match="--nproc must be >= 2"):
        build_eval_command(request, 1, 1, {})


def test_dry_run_prints_the_command_without_running():
    proc = run_ft("launch", "examples/chat-demo.yaml", "--nproc", "2", "--port", "29533", "--dry-run",
                  "--set", "distributed.zero_stage=3")
    words = shlex.split(proc.stdout.strip())
    assert "accelerate.commands.launch" in words
    assert words[words.index("--num_processes") + 1] == "2"
    assert words[words.index("--main_process_port") + 1] == "29533"
    assert words[words.index("--zero_stage") + 1] == "3"
    assert words[words.index("train") + 1:] == ["examples/chat-demo.yaml", "--set", "distributed.zero_stage=3",
                                               "--resume", "auto"]


EXIT_SCRIPT = """
import atexit, sys, threading, time
import torch  # a process that imported torch: what exit_without_finalizing is for
from launcher.cli import exit_without_finalizing

out = sys.argv[1]
def late_writer():  # a non-daemon thread: the interpreter waits for it, so must we
    time.sleep(0.3)
    open(out + ".thread", "w").write("done")
threading.Thread(target=late_writer).start()
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
print("buffered stdout line", end="")
exit_without_finalizing(eval(sys.argv[2]))
"""


@pytest.mark.parametrize("code, status, stderr", [(None, 0, ""), (75, 75, ""), ("a message", 1, "a message")])
def test_exit_without_finalizing_keeps_status_threads_atexit_and_output(tmp_path, code, status, stderr):
    """`ft` skips only the interpreter's module teardown: the exit status is what the command chose (75 for a
    checkpointed stop), non-daemon threads finish, atexit handlers (trackers, logging) run, buffered output
    arrives."""
    out = tmp_path / "probe"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(out), repr(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered stdout line" and proc.stderr.strip() == stderr
    assert (out.parent / "probe.thread").read_text() == "done" and (out.parent / "probe.atexit").read_text() == "ran"
