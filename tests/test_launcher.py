"""The workstation launcher is a pure (argv, env) builder; --dry-run prints exactly that."""

import shlex

from launcher.workstation import LaunchSpec, build_command
from tests.conftest import run_ft


def test_build_command_is_pure_and_complete():
    spec = LaunchSpec(config_path="examples/chat-demo.yaml", overrides=("train.lr=1e-4", "output_dir=/x y"), nproc=4,
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
    assert tail == ["launcher.cli", "train", "examples/chat-demo.yaml", "--set", "train.lr=1e-4",
                    "--set", "output_dir=/x y", "--resume", "auto"]
    assert env["PATH"] == "/bin" and int(env["OMP_NUM_THREADS"]) >= 1
    assert build_command(spec, {"OMP_NUM_THREADS": "7"})[1]["OMP_NUM_THREADS"] == "7"  # user's choice kept


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
