"""Per-step metrics, MFU, TensorBoard, the end-of-run summary and `ft plot`, checked against what the run itself
computed (metrics.jsonl) and against an independent count of the model's FLOPs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_args, tiny_run_args

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

# builtin:tiny-llama (ftcore/assets/tiny-llama/config.json) with LoRA r=16 on its 7 linear layers per block.
H, KV, INTER, L, V, R = 128, 64, 344, 4, 32000, 16
FROZEN = L * (H * H + 2 * H * KV + H * H + 3 * H * INTER) + H * V  # q, k, v, o, gate, up, down + lm_head
LORA = L * R * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + INTER) + (INTER + H))


@pytest.fixture(scope="module")
def run(training_runs):
    return training_runs.get(*tiny_args("--set", "logging.peak_tflops=0.5"))


def test_step_metrics_and_mfu(run):
    out, log = run
    steps = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    for m in steps:
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["step_time_s"])
        assert m["trained_tokens_per_s"] == pytest.approx(m["trained_tokens"] / m["step_time_s"])
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
        # Model FLOPs: 6 per trained and 4 per frozen matrix element per token, plus attention (at most every
        # token attending over max_seq_len=64 tokens).
        matrices = m["tokens"] * (6 * LORA + 4 * FROZEN)
        assert matrices < m["flops"] <= matrices + 12 * L * H * m["tokens"] * 64
        assert m["mfu"] == pytest.approx(m["flops"] / m["step_time_s"] / (0.5e12 * 2))
        assert m["host_rss_gib"] > 0.1
        assert "gpu_max_allocated_gib" not in m  # CPU run
    assert "mfu " in log and "rss " in log


def test_tensorboard_holds_the_logged_values(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    metrics = read_jsonl(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tb")).Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("perf/tokens_per_s", "tokens_per_s"),
                     ("perf/mfu", "mfu"), ("eval/loss", "eval_loss"), ("memory/host_rss_gib", "host_rss_gib")):
        logged = {m["step"]: m[key] for m in metrics if key in m}
        scalars = {e.step: e.value for e in events.Scalars(tag)}
        assert scalars.keys() == logged.keys() and logged, tag
        for step, value in logged.items():
            assert scalars[step] == pytest.approx(value, rel=1e-6), (tag, step)


def test_summary_adds_up(run):
    out, log = run
    summary = json.loads((out / "summary.json").read_text())
    steps = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert summary["steps_trained"] == 8 and summary["tokens"] == sum(m["tokens"] for m in steps)
    assert summary["trained_tokens"] == sum(m["trained_tokens"] for m in steps)
    step_time = sum(m["step_time_s"] for m in steps)
    assert summary["mean_tokens_per_s"] == pytest.approx(summary["tokens"] / step_time)
    assert summary["mfu"] == pytest.approx(sum(m["flops"] for m in steps) / step_time / (0.5e12 * 2))
    assert summary["peak_host_rss_gib"] == pytest.approx(max(m["host_rss_gib"] for m in steps))
    assert summary["wall_time_s"] >= step_time
    assert Path(summary["outputs"]["final"]).is_dir() and Path(summary["outputs"]["tensorboard"]).is_dir()
    assert f"summary: 8 steps, {summary['tokens']:,} tokens" in log and f"outputs: {out / 'final'}" in log


def test_ft_plot_draws_the_run(run, tmp_path):
    import matplotlib.image

    from ftcore.tools.plot import read_series

    out, _ = run
    png = tmp_path / "run.png"
    proc = ft_in_process("plot", str(out), "--out", str(png))
    assert f"wrote {png} (8 steps, 2 evals)" in proc.stdout
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 500
    series = read_series(out)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert series["loss"] == [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert series["eval_loss"] == [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    bad = ft_in_process("plot", str(tmp_path / "nothing"), check=False)
    assert bad.returncode == 1 and "metrics.jsonl does not exist" in bad.stderr


def test_cpu_without_peak_omits_mfu_and_report_to_none_writes_no_events(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = tmp_path / "run"
    proc = run_ft("train", *tiny_run_args(out, "--set", "logging.report_to=none", "--set", "train.max_steps=3",
                                          "--set", "optimizer.warmup_steps=0", "--set", "evaluation.every=0"), env=env)
    assert "MFU: not reported (no peak FLOP/s known for a CPU; set logging.peak_tflops to report it)" in proc.stdout
    assert all("mfu" not in m for m in read_jsonl(out / "metrics.jsonl"))
    assert not (out / "tb").exists() and json.loads((out / "summary.json").read_text())["mfu"] is None
