"""The benchmarks start `ft` as the tests do (this interpreter's, not whatever is on PATH) and a failed command
says why."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from commands import CommandFailed, ft, run_checked  # noqa: E402


def test_ft_runs_with_no_ft_on_path_and_a_failure_says_why(tmp_path):
    assert ft("config")[:3] == [sys.executable, "-m", "launcher.cli"]
    bare = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}
    missing = tmp_path / "missing.yaml"
    with pytest.raises(CommandFailed) as failed:
        run_checked(ft("config", str(missing)), env=bare)
    message = str(failed.value)
    assert "exited 2" in message or "exited 1" in message, message
    assert str(missing) in message.split("--- stderr (end)")[1], message
