"""The fault suite at CI scale (a few trials each; benchmarks/faults.py runs it at full scale and prints JSON).
Run it alone with `pytest -m faults`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ftcore.checkpoint import step_dir_name
from tests.faults import harness
from tests.faults.bad_inputs import cases, run_case

pytestmark = pytest.mark.faults
# The campaigns below start real 2-process runs; so do the bad-input cases that damage a trained run's outputs.
TRAINS = [pytest.mark.multiproc, pytest.mark.trains]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    return harness.reference_run(tmp_path_factory.mktemp("faults-reference"))


@pytest.mark.multiproc
@pytest.mark.trains
def test_kill_9_at_random_moments_loses_nothing(reference, tmp_path):
    counts = harness.kill_campaigns(tmp_path, trials=4, seed=int(os.environ.get("FT_FAULT_SEED", "0")),
                                    reference=reference, kills_per_run=4)
    assert counts["kill_trials"] == 4  # one at each moment: start-up, a step, a checkpoint write, a prune
    assert counts["kill_moments"] == {"startup": 1, "step": 1, "checkpoint": 1, "prune": 1}, counts
    assert counts["corrupt_checkpoints"] == 0 and counts["orphans_after_kill"] == 0, counts
    assert counts["kill_resumed_ok"] == counts["kill_trials"], counts


@pytest.mark.multiproc
@pytest.mark.trains
def test_stop_signals_at_random_moments_checkpoint_and_resume_equal(reference, tmp_path):
    counts = harness.signal_campaigns(tmp_path, trials=4, seed=0, reference=reference)  # start-up, step, eval, save
    assert counts["signal_resumed_equal"] == counts["signal_trials"] == 4, counts


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("hang", [False, True], ids=["dead-rank", "hung-rank"])
def test_a_dead_or_hung_rank_ends_the_run_in_bounded_time(tmp_path, hang):
    result = harness.dead_or_hung_rank(tmp_path, 0, hang=hang)
    assert result["detected"], result
    assert result["orphans"] == 0, result
    bound = harness.TIMEOUT_S + harness.STOP_GRACE_S + 15 if hang else 30
    assert result["seconds"] <= bound, result


class Prepared:
    """What the bad-input cases read: the built-in model dir, and only for the cases that damage a trained run's
    outputs, the reference run (trained on first use): the other cases train nothing."""

    def __init__(self, request):
        self.request = request

    def __getitem__(self, key: str):
        if key == "model":
            return self.request.getfixturevalue("builtin_model_dir")
        reference = self.request.getfixturevalue("reference")
        return {"run": reference, "run_args": json.dumps(harness.run_args(reference))}[key]


@pytest.fixture
def prepared(request) -> Prepared:
    return Prepared(request)


# The cases that need a trained run (a checkpoint to damage and resume, an adapter to export).
NEEDS_A_TRAINED_RUN = {"checkpoint: a rank's shard missing", "checkpoint: truncated file",
                       "checkpoint: written by another config", "export: adapter on the wrong base",
                       "export: corrupted safetensors header", "export: output exists",
                       "export: unwritable destination", "export: bad --dtype"}


def case_params(names=None) -> list:
    return [pytest.param(name, setup, id=name, marks=TRAINS if name in NEEDS_A_TRAINED_RUN else [])
            for name, setup in cases() if names is None or name in names]


@pytest.mark.parametrize("name, setup", case_params())
def test_bad_input_gets_one_clear_line_and_leaves_nothing(name, setup, prepared, tmp_path):
    result = run_case(name, setup, tmp_path, prepared, in_process=True)
    assert result["clear"], result
    assert not result["traceback"], result
    assert not result["partial"], result


# The same line from a real `ft` process, one case of each kind (the others run in process above).
THROUGH_THE_REAL_CLI = ["config: unknown key (YAML line)", "data: invalid JSON", "model: config.json without weights",
                        "export: corrupted safetensors header"]


@pytest.mark.parametrize("name, setup", case_params(THROUGH_THE_REAL_CLI))
def test_the_real_cli_gives_the_same_one_line(name, setup, prepared, tmp_path):
    result = run_case(name, setup, tmp_path, prepared)
    assert result["clear"] and not result["traceback"] and not result["partial"], result


def test_debug_shows_the_traceback(prepared, tmp_path):
    name, setup = next(c for c in cases() if c[0] == "data: invalid JSON")
    result = run_case(name, setup, tmp_path, prepared, debug=True)
    assert result["clear"] and result["traceback"], result


def test_bad_input_suite_has_at_least_30_cases():
    assert len(cases()) >= 30


@pytest.mark.multiproc
@pytest.mark.trains
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    result = harness.disk_full_checkpoint(tmp_path, reference)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["clean"] and result["resumed_after_freeing"], result


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("during_write", [False, True], ids=["too-small", "fills-while-writing"])
def test_disk_full_during_an_export_leaves_nothing(reference, tmp_path, during_write):
    result = harness.disk_full_export(tmp_path, reference / "final", during_write)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["clean"], result


@pytest.mark.multiproc
@pytest.mark.trains
def test_a_half_written_log_line_is_cut_before_the_resumed_run_appends(reference, tmp_path):
    """A kill in the middle of an append leaves half a JSON line in metrics.jsonl and the audit logs; the resumed
    run must not glue its first line onto it."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    checkpoints, resume_from = out / "checkpoints", step_dir_name(harness.STEPS - 2)
    shutil.rmtree(checkpoints / step_dir_name(harness.STEPS))
    (checkpoints / "latest").write_text(resume_from + "\n")
    shutil.rmtree(out / "final")
    for log in [out / "metrics.jsonl", *(out / "audit").glob("rank*.jsonl")]:
        with open(log, "a") as f:
            f.write('{"step": 11, "lo')
    launch = harness.Launch(harness.run_args(out), tmp_path / "resume.log")
    assert launch.wait() == 0, launch.text()[-3000:]
    assert f"resumed from {checkpoints / resume_from}" in launch.text()
    assert harness.logs_whole(out)
    assert harness.same_final(out, reference)
