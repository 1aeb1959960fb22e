"""`ft`: the command line. Each subcommand parses, validates, then dispatches; none imports torch unless it runs
training or generation.

    ft config examples/demo.yaml --set optimizer.lr=1e-4       print the resolved config
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

import atexit
import os
import sys
import threading
from typing import NoReturn

from launcher import run_commands, tool_commands  # noqa: F401  (each registers its commands on the app)
from launcher.app import app


def main() -> None:
    """The `ft` console script (and `python -m launcher.cli`, which every launcher starts the ranks with)."""
    try:
        app()
    except SystemExit as e:
        if "torch" not in sys.modules:
            raise
        exit_without_finalizing(e.code)


def exit_without_finalizing(code: object) -> NoReturn:
    """End a process that imported torch the way the interpreter would, minus its last phase: wait for non-daemon
    threads, run the atexit handlers (trackers finish their runs, logging flushes), flush stdout and stderr, then
    os._exit. The phase skipped frees every module of torch, transformers, peft and DeepSpeed one by one: about
    1.7 s of CPU per process on a 2-core machine, paid by each rank and the launcher after the run has finished. It
    writes nothing: every file a command writes is closed (checkpoints and exports renamed into place) before the
    command returns, and the process group is destroyed by then."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): Python prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
