"""`make gpu-check`: what a machine with a CUDA GPU says about ft, as one JSON object.

Runs the `gpu`-marked tests and a short bf16 LoRA run of the real model (builtin:gemma-3-270m, 2 steps in one
process, then 2 processes when the machine has 2 GPUs), and reports the device, versions, the tests' outcome,
the run's losses, tokens/s, attention backend and peak GPU memory. Needs no network once ft and its wheels are
installed (make gpu-check installs them from the wheelhouse). Exit status 0 only when everything passed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "flash-attn",
                 "liger-kernel", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    return {"cuda": True, "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "bf16": torch.cuda.is_bf16_supported(), "torch_cuda": torch.version.cuda}


def gpu_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "--timeout", "900"], cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"exit": proc.returncode, "summary": tail, **counts, "failures": failures[:20]}


def lora_step(nproc: int, work: Path) -> dict:
    out = work / f"gemma-bf16-{nproc}"
    sets = {"output_dir": out, "model.dtype": "bfloat16", "train.max_steps": 2, "evaluation.every": 0,
            "evaluation.generate": "[]", "logging.every": 1, "checkpoint.every_steps": 100,
            "data.max_seq_len": 64, "train.micro_batch_size": 8}
    argv = [sys.executable, "-m", "launcher.cli", "launch", "examples/demo.yaml", "--nproc", str(nproc),
            *(w for k, v in sets.items() for w in ("--set", f"{k}={v}"))]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    result = {"processes": nproc, "exit": proc.returncode}
    if proc.returncode != 0:
        return {**result, "error": (proc.stderr or proc.stdout).strip().splitlines()[-5:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    log = proc.stdout + proc.stderr
    attention = re.search(r"attention (\w+)", log)
    loss_impl = re.search(r"\| loss (\w+)", log)
    return {**result, "losses": [r["loss"] for r in steps], "tokens_per_s": steps[-1].get("tokens_per_s"),
            "peak_gpu_max_allocated_gib": max(r.get("gpu_max_allocated_gib", 0.0) for r in steps),
            "attention": attention.group(1) if attention else None,
            "loss_impl": loss_impl.group(1) if loss_impl else None,
            "finite": all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in steps)}


def main() -> None:
    report: dict = {"device": device(), "versions": versions()}
    if not report["device"]["cuda"]:
        report["error"] = "no CUDA GPU visible to torch: nothing to check"
        print(json.dumps(report, indent=1))
        raise SystemExit(1)
    report["gpu_tests"] = gpu_tests()
    with tempfile.TemporaryDirectory(prefix="ft-gpu-check-") as work:
        report["real_model_bf16_lora"] = [lora_step(1, Path(work))]
        if report["device"]["count"] >= 2:
            report["real_model_bf16_lora"].append(lora_step(2, Path(work)))
    ok = report["gpu_tests"]["exit"] == 0 and all(r["exit"] == 0 and r.get("finite")
                                                  for r in report["real_model_bf16_lora"])
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
