"""What a step cost and how well the hardware was used: model FLOPs per step (attention included), MFU against the
device's peak, memory, and where the numbers go (metrics.jsonl, TensorBoard, the end-of-run summary; MLflow and
W&B replicate metrics.jsonl: ftcore/tracking/).

Model FLOPs (PaLM's convention, MFU not HFU: recomputation from checkpointing is not counted):
    a token through a weight matrix of n elements costs 2n FLOPs forward and 4n backward (gradients for the
    input and for the weight); a frozen matrix needs only the input gradient: 2n forward + 2n backward.
    Attention scores and their weighted sum cost 4 * d_attn * n FLOPs forward for a token in a sample of n
    tokens, per layer, and twice that backward: 12 * layers * d_attn * n^2 per sample.
Peak FLOPs: dense bf16/fp16 tensor-core peak of the GPU, looked up by name in PEAK_TFLOPS, or `logging.peak_tflops`.
On CPU (no table entry) MFU is omitted unless `logging.peak_tflops` is given.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ftcore.durable import atomic_write_text
from ftcore.model_geometry import logical_numel
from ftcore.run_dir import RunDir

# Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s per GPU, from the vendors' data sheets. More specific
# names first: the first substring found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0), ("GH200", 989.0), ("H200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A40", 150.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 6000 Ada", 365.0), ("RTX A6000", 155.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
    ("MI300X", 1307.0), ("MI250X", 383.0), ("MI250", 362.0),
]


def peak_flops_per_device(device_name: Optional[str], override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s of one device: logging.peak_tflops, else the known peak of a GPU by name, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


class FlopCounter:
    """Model FLOPs of a training step from the model's own modules (4-bit and ZeRO-3 weights at their real size)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, attention_width: int):
        self.trained_matrix = self.frozen_matrix = 0
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            n = logical_numel(module.weight)
            if module.weight.requires_grad:
                self.trained_matrix += n
            else:
                self.frozen_matrix += n
        self.num_layers = num_layers
        self.attention_width = attention_width

    def step_flops(self, tokens: int, sample_lengths: list[int]) -> float:
        """FLOPs of one micro batch: 6 per trained / 4 per frozen weight per token, plus attention's quadratic term."""
        matrices = tokens * (6 * self.trained_matrix + 4 * self.frozen_matrix)
        attention = 12 * self.num_layers * self.attention_width * sum(n * n for n in sample_lengths)
        return float(matrices + attention)


def classification_scores(labels: list[int], predictions: list[int], num_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted class). Macro-F1 averages
    the per-class F1 over the classes that occur as a label or a prediction (scikit-learn's default set); a class
    with no correct prediction has F1 0."""
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for label, predicted in zip(labels, predictions):
        confusion[label][predicted] += 1
    total = len(labels)
    correct = sum(confusion[c][c] for c in range(num_classes))
    f1s = []
    for c in range(num_classes):
        support = sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        if support == 0 and predicted == 0:
            continue
        f1s.append(2 * confusion[c][c] / (support + predicted))  # = 2PR / (P + R)
    return {"accuracy": correct / total if total else 0.0, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "confusion": confusion, "samples": total}


def memory_now(cuda: bool) -> list[float]:
    """[GPU max allocated GiB, GPU max reserved GiB, host RSS GiB] of this process (GPU figures 0 on CPU)."""
    import psutil

    gib = 1024 ** 3
    rss = psutil.Process().memory_info().rss / gib
    if not cuda:
        return [0.0, 0.0, rss]
    return [torch.cuda.max_memory_allocated() / gib, torch.cuda.max_memory_reserved() / gib, rss]


class MetricsSink:
    """Rank 0's outputs: metrics.jsonl (one object per step or eval) and TensorBoard event files under tb/."""

    TB_NAMES = {"loss": "train/loss", "base_kl": "train/base_kl", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "eval_loss": "eval/loss", "eval_ppl": "eval/ppl", "eval_accuracy": "eval/accuracy",
                "eval_macro_f1": "eval/macro_f1", "tokens_per_s": "perf/tokens_per_s",
                "trained_tokens_per_s": "perf/trained_tokens_per_s",
                "tokens_per_s_per_device": "perf/tokens_per_s_per_device", "mfu": "perf/mfu",
                "step_time_s": "perf/step_time_s", "packing_efficiency": "data/packing_efficiency",
                "gpu_max_allocated_gib": "memory/gpu_max_allocated_gib",
                "gpu_max_reserved_gib": "memory/gpu_max_reserved_gib", "host_rss_gib": "memory/host_rss_gib"}

    def __init__(self, output_dir: Path, report_to: list[str], resume_step: int):
        run = RunDir(output_dir)
        self.jsonl = run.metrics
        drop_partial_line(self.jsonl)  # a process killed mid-write leaves half a line; appending must not glue on
        # metrics.jsonl is the timeline this run's weights went through: the rows an interrupted attempt wrote
        # after the checkpoint this attempt starts from are trained again, so they move aside (kept).
        set_aside_rows_after(self.jsonl, resume_step, run.metrics_superseded)
        self.tb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a preempted attempt wrote after its checkpoint are dropped on resume.
            self.tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step if resume_step else None)

    def record(self, metrics: dict) -> None:
        """Append one step's or eval's metrics, with the time it was recorded (and to TensorBoard when on)."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({**metrics, "time": round(time.time(), 3)}) + "\n")
        if self.tb is not None:
            for key, tag in self.TB_NAMES.items():
                value = metrics.get(key)
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(tag, value, metrics["step"])

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def drop_partial_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last complete line."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def set_aside_rows_after(path: Path, step: int, aside: Path) -> None:
    """Move the rows of a JSON-lines metrics file whose step is past `step` to the end of `aside`."""
    if not path.is_file():
        return
    kept, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):
            later = False  # not a row ft wrote: left where it is
        (moved if later else kept).append(line)
    if not moved:
        return
    with open(aside, "a") as f:
        f.writelines(moved)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(path, "".join(kept))


def write_summary(path: Path, summary: dict) -> None:
    """Write a JSON summary atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
