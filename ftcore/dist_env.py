"""The process environment torch.distributed reads (RANK, WORLD_SIZE, MASTER_ADDR, ...). No torch import, so the
launcher can use it too."""

from __future__ import annotations

import os
import socket


class DistEnvError(RuntimeError):
    """An inconsistent process environment, naming the variables."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_env() -> None:
    """A plain `python`/`ft train` start is a world of one: give torch.distributed what a launcher would."""
    if "WORLD_SIZE" in os.environ:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistEnvError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start with `ft launch`, "
                               "torchrun or accelerate launch, or unset WORLD_SIZE for a single process")
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
