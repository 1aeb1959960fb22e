"""`ft plot RUN_DIR`: one PNG of a run's metrics.jsonl -- loss (train and eval), learning rate and tokens/s over
steps, and evaluation.generate's scores when the run has them. Offline: reads the file, imports no training code."""

from __future__ import annotations

import json
from pathlib import Path

from ftcore.run_dir import RunDir


class PlotError(ValueError):
    """A run directory with nothing to plot, as one line."""
    pass


def read_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per metric; a resumed run's repeated steps keep their last value."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {run_dir} a run directory (output_dir)?")
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise PlotError(f"{path}:{number}: not JSON ({e})") from None
        step = record.get("step")
        generated = [k for k in record if k.startswith("eval_gen_") and k != "eval_gen_samples"]
        for key in ("loss", "eval_loss", "lr", "tokens_per_s", "trained_tokens_per_s", *generated):
            if isinstance(record.get(key), (int, float)):
                series.setdefault(key, {})[step] = float(record[key])
    if "loss" not in series:
        raise PlotError(f"{path} holds no training steps yet")
    return {key: sorted(values.items()) for key, values in series.items()}


def plot_run(run_dir: Path, out: Path) -> dict[str, list[tuple[int, float]]]:
    """Write the PNG; returns the series drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = read_series(run_dir)
    generated = sorted(k for k in series if k.startswith("eval_gen_"))
    fig, axes = plt.subplots(4 if generated else 3, 1, figsize=(9, 13 if generated else 10), sharex=True)
    ax_loss, ax_lr, ax_speed = axes[:3]
    if generated:  # evaluation.generate's scores of generated answers
        for key in generated:
            axes[3].plot(*zip(*series[key]), "o-", label=key[9:])
        axes[3].set_ylabel("generated answers' score")
        axes[3].set_ylim(-0.02, 1.02)
        axes[3].legend()
        axes[3].grid(alpha=0.3)
    ax_loss.plot(*zip(*series["loss"]), label="train loss", linewidth=1)
    if "eval_loss" in series:
        ax_loss.plot(*zip(*series["eval_loss"]), "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    if "lr" in series:
        ax_lr.plot(*zip(*series["lr"]), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    if "tokens_per_s" in series:
        ax_speed.plot(*zip(*series["tokens_per_s"]), label="tokens/s", linewidth=1)
    if "trained_tokens_per_s" in series:
        ax_speed.plot(*zip(*series["trained_tokens_per_s"]), label="trained tokens/s", linewidth=1)
    ax_speed.set_ylabel("tokens/s (all ranks)")
    axes[-1].set_xlabel("step")
    ax_speed.legend()
    for ax in (ax_loss, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return series
