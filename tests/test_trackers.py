"""Experiment trackers with the real components: an MLflow tracking server started here on a loopback port (sqlite
store, proxied artifacts), read back with MlflowClient; W&B in offline mode, read back from its run files. One
tracker run per training run across a kill -9, a resume, a world-size change; a server that goes away mid-run never
stops training, and rerunning the command delivers what it missed."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ftcore.config import ConfigError, load_config
from ftcore.metrics import set_aside_rows_after
from ftcore.tracking import metric_name, tracked_metrics
from ftcore.tracking.tracker import flat_params
from tests.conftest import ROOT, read_jsonl, run_ft, tiny_run_args

# What replayed steps reproduce exactly (same world size, exact resume); speed and memory are the attempt's own.
EXACT = ("loss", "lr", "grad_norm", "tokens", "trained_tokens", "eval_loss")


# ------------------------------------------------------------------------------------------ units
def test_report_to_takes_one_name_a_list_or_none():
    assert load_config(None, ["logging.report_to=mlflow"]).logging.report_to == ["mlflow"]
    assert load_config(None, ["logging.report_to=[tensorboard,wandb,wandb]"]).logging.report_to == ["tensorboard",
                                                                                                 "wandb"]
    assert load_config(None, ["logging.report_to=none"]).logging.report_to == []
    assert load_config(None, []).logging.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="logging.report_to.*none cannot be combined"):
        load_config(None, ["logging.report_to=[none,mlflow]"])
    with pytest.raises(ConfigError, match="logging.report_to"):
        load_config(None, ["logging.report_to=comet"])


def test_metric_names_and_parameters():
    assert [metric_name(k) for k in ("loss", "eval_loss", "eval_reward_accuracy", "mfu", "host_rss_gib", "chosen")] \
        == ["train/loss", "eval/loss", "eval/reward_accuracy", "perf/mfu", "memory/host_rss_gib", "train/chosen"]
    row = {"step": 3, "time": 1.5, "loss": 2.0, "grad_norm": None, "tokens": 7, "flag": True, "nan": float("nan")}
    assert tracked_metrics(row) == {"train/loss": 2.0, "train/tokens": 7.0}
    params = flat_params(load_config(None, ["optimizer.lr=0.001"]).model_dump(mode="json"))
    assert params["optimizer.lr"] == "0.001" and params["data.train"].startswith("[{")


def test_rows_past_the_resume_step_move_aside(tmp_path):
    jsonl, aside = tmp_path / "metrics.jsonl", tmp_path / "metrics.superseded.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 3, 4)))
    set_aside_rows_after(jsonl, 2, aside)
    assert [r["step"] for r in read_jsonl(jsonl)] == [1, 2]
    assert [r["step"] for r in read_jsonl(aside)] == [3, 3, 4]
    set_aside_rows_after(jsonl, 2, aside)  # nothing past 2: unchanged
    assert len(read_jsonl(jsonl)) == 2 and len(read_jsonl(aside)) == 3


def test_the_first_step_waits_for_the_tracker_run_to_open_but_not_for_a_tracker_that_fails_or_hangs(tmp_path):
    """The run id is in trackers.json before the first step; a tracker that errors releases the wait at once, one
    that hangs holds it for open_timeout_s, with one line; neither stops the run."""
    import threading

    from ftcore.run_dir import RunDir
    from ftcore.tracking import Feed, Ledger, Tracker, wait_until_opened

    release = threading.Event()

    class Opens(Tracker):
        name = "opens"

        def open(self, run_id, delivered):
            return "run-1", {}

        def where(self):
            return "here"

    class Fails(Opens):
        name = "fails"

        def open(self, run_id, delivered):
            raise ConnectionError("refused")

    class Hangs(Opens):
        name = "hangs"

        def open(self, run_id, delivered):
            release.wait(30)
            raise ConnectionError("gave up")

    lines: list[str] = []
    ledger = Ledger(tmp_path)

    def feeds(*trackers):
        started = [Feed(t(), tmp_path / "metrics.jsonl", ledger, None, lines.append, lambda *_: None)
                   for t in trackers]
        for feed in started:
            feed.start()
        return started

    started = time.monotonic()
    wait_until_opened(feeds(Opens, Fails), 30, lines.append)
    assert time.monotonic() - started < 10
    assert json.loads(RunDir(tmp_path).trackers.read_text())["opens"]["run_id"] == "run-1"
    assert any(line.startswith("fails: not reachable (refused)") for line in lines)
    started = time.monotonic()
    wait_until_opened(feeds(Hangs), 0.5, lines.append)
    assert 0.5 <= time.monotonic() - started < 10
    assert lines[-1].startswith("hangs: the run did not open within 0.5 s (tracking.open_timeout_s); training starts")
    release.set()


# ------------------------------------------------------------------------------------------ MLflow server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a loopback port: sqlite backend store, artifacts proxied into a directory."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.proc = None

    def start(self) -> str:
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not come up: " + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    yield server
    server.stop()


def mlflow_rows(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics}


def jsonl_rows(out: Path) -> dict[str, list[tuple[int, float]]]:
    rows: dict[str, list[tuple[int, float]]] = {}
    for row in read_jsonl(out / "metrics.jsonl"):
        for key, value in tracked_metrics(row).items():
            rows.setdefault(key, []).append((row["step"], value))
    return {key: sorted(values) for key, values in rows.items()}


def tracker_args(out: Path, uri: str, *extra: str) -> list[str]:
    return tiny_run_args(out, "--set", "train.max_steps=12", "--set", "train.grad_accum_steps=2",
                         "--set", "train.micro_batch_size=2", "--set", "logging.report_to=[mlflow]",
                         "--set", f"tracking.mlflow.tracking_uri={uri}", "--set", "tracking.mlflow.experiment=t",
                         *extra)


def kill_after_step(proc: subprocess.Popen, out: Path, step: int, timeout_s: float = 300) -> None:
    """kill -9 once metrics.jsonl shows `step`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended before the kill: {proc.stdout.read()[-3000:]}"
        rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
        if any(r.get("step", 0) >= step for r in rows if "lr" in r):
            proc.kill()
            proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError("run did not reach the step to kill at")


@pytest.mark.multiproc
@pytest.mark.trains
def test_mlflow_one_run_across_kill9_resume_and_world_size_change(mlflow_server, tmp_path):
    """kill -9 mid-run, resume to a time slice's end, then finish on 2 processes: one MLflow run holds every step
    of metrics.jsonl once, with the same numbers; the params, attempts, artifacts and final status are there."""
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "run", mlflow_server.uri
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *tracker_args(out, uri)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_after_step(first, out, 6)  # checkpoints every 4: steps 5.. (as far as it got) are trained again
    # The run opened before step 1 (tracking.open_timeout_s), so its id was saved before anything could be lost.
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    second = run_ft("train", *tracker_args(out, uri, "--set", "train.stop_at_step=9"))
    assert "resumed from" in second.stdout and f"run {run_id}" in second.stdout
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"  # a time slice: to be resumed
    third = run_ft("launch", *tracker_args(out, uri, "--set", "train.grad_accum_steps=1"), "--nproc", "2")
    assert "world size changed from 1 to 2" in third.stdout and f"run {run_id}" in third.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ft.attempts"] == "3"
    assert run.data.params["train.max_steps"] == "12" and run.data.params["adapter.method"] == "lora"
    tracked, written = mlflow_rows(uri, run_id), jsonl_rows(out)
    assert set(written) <= set(tracked)
    for key, rows in written.items():
        steps = [s for s, _ in tracked[key]]
        assert steps == sorted(set(steps)) == [s for s, _ in rows], key  # each step once, none missing
        if key in {metric_name(k) for k in EXACT}:
            assert tracked[key] == rows, key
    assert [s for s, _ in tracked["train/loss"]] == list(range(1, 13))
    assert {"summary.json", "metrics.png", "config.yaml"} <= {f.path for f in client.list_artifacts(run_id)}
    assert tracked["summary/last_step"] == [(9, 9.0), (12, 12.0)]  # each attempt that trained: its summary


@pytest.mark.multiproc
@pytest.mark.trains
def test_mlflow_server_gone_mid_run_never_stops_training(mlflow_server, tmp_path):
    """The server is killed after step 3: training finishes, one warning line, metrics.jsonl complete, the end
    line says what was not delivered; with the server back (another port), rerunning the command delivers it."""
    out = tmp_path / "run"
    args = tracker_args(out, mlflow_server.uri, "--set", "tracking.finish_timeout_s=5",
                        "--set", "train.max_steps=10")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300

    def opened_and_past_step_3() -> bool:  # (the tracker may open before the first row is written)
        jsonl = out / "metrics.jsonl"
        return ((out / "trackers.json").is_file() and jsonl.is_file()
                and any(r.get("step", 0) >= 3 for r in read_jsonl(jsonl)))

    while not opened_and_past_step_3():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    # The run is paused while the server goes away (stopping it takes a moment): otherwise, on a busy machine,
    # the run could finish and deliver everything before the server is gone, and the test would race it.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r) < 10
        mlflow_server.stop()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    assert text.count("mlflow: not reachable") == 1, text[-3000:]
    assert "final adapter saved" in text
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r] == list(range(1, 11))
    last = [line for line in text.splitlines() if "not delivered" in line]
    assert len(last) == 1 and "-10 not delivered" in last[0] and "rerunning the same command" in last[0], last

    uri = mlflow_server.start()  # the same store on a new port: the run id is the checkpoint's
    again = run_ft("train", *tracker_args(out, uri, "--set", "train.max_steps=10"))
    assert "nothing to train" in again.stdout and "not delivered" not in again.stdout
    run_id = json.loads((out / "checkpoints" / "step-000010" / "trainer_state.json").read_text())["trackers"]["mlflow"]
    tracked, written = mlflow_rows(uri, run_id), jsonl_rows(out)
    for key in {metric_name(k) for k in EXACT}:
        assert tracked[key] == written[key], key


# ------------------------------------------------------------------------------------------ W&B offline
def wandb_records(path: Path):
    """The protobuf records of a W&B run file (LevelDB log format: 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dir: Path) -> tuple[str, dict[int, dict[str, float]]]:
    (file,) = run_dir.glob("run-*.wandb")
    run_id, steps = None, {}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            steps[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, steps


@pytest.mark.multiproc
@pytest.mark.trains
def test_wandb_offline_resumed_run_writes_to_the_same_run_id(tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(out, "--set", "logging.report_to=[wandb]", "--set", "tracking.wandb.mode=offline",
                         "--set", "tracking.wandb.project=t")
    run_ft("train", *args, "--set", "train.stop_at_step=4")
    second = run_ft("train", *args)
    assert "resumed from" in second.stdout
    attempts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    histories = [wandb_history(d) for d in attempts]
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    assert [h[0] for h in histories] == [run_id, run_id]
    assert sorted(histories[0][1]) == [1, 2, 3, 4] and sorted(histories[1][1]) == [5, 6, 7, 8]
    logged = {**histories[0][1], **histories[1][1]}
    for row in read_jsonl(out / "metrics.jsonl"):
        for key, value in tracked_metrics(row).items():
            assert logged[row["step"]][key] == pytest.approx(value, rel=1e-12), (row["step"], key)
    assert (attempts[1] / "files" / "summary.json").is_file() and (attempts[1] / "files" / "metrics.png").is_file()
    checkpoint = json.loads((out / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert checkpoint["trackers"]["wandb"] == run_id
    # --resume none starts a new timeline: a new W&B run, which holds only its own steps.
    run_ft("train", *args, "--set", "train.stop_at_step=2", "--resume", "none")
    new_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    assert new_id != run_id
    (new_dir,) = (out / "wandb").glob(f"offline-run-*-{new_id}")
    assert sorted(wandb_history(new_dir)[1]) == [1, 2]
