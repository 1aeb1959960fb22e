"""What the fine-tuning methods of the Methods section achieve on the built-in tasks, on this machine.

    python benchmarks/methods.py [--nproc 2]

- classification: `examples/classify-licenses.yaml` (LoRA, 120 steps, 2 processes): eval accuracy, macro-F1 and
  the majority-class accuracy it should beat, from the run's own eval report.
- base_kl: `examples/lora-base-kl.yaml` (loss.base_kl 1.0) run again with 0.0 and 10.0 (same seed, same data):
  the KL(base || fine-tuned) per trained token on the chat-demo eval set (the answers' tokens), and the eval loss.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(config: str, out: Path, nproc: int, *overrides: str) -> float:
    started = time.perf_counter()
    args = [sys.executable, "-m", "launcher.cli", "launch", config, "--nproc", str(nproc),
            "--set", f"output_dir={out}", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def classification(work: Path, nproc: int) -> dict:
    out = work / "classify"
    seconds = launch("examples/classify-licenses.yaml", out, nproc)
    report = json.loads(sorted((out / "eval").glob("step*.json"))[-1].read_text())
    labels = [p["label"] for p in report["predictions"]]
    majority = collections.Counter(labels).most_common(1)[0][1] / len(labels)
    return {"steps": report["step"], "eval_samples": len(labels), "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"], "majority_class_accuracy": majority,
            "confusion": report["confusion"], "labels": report["labels"], "wall_s": round(seconds, 1)}


def kl_to_base(adapter_dir: Path) -> tuple[float, float]:
    """(KL(base || fine-tuned) per trained token, eval loss) over the chat-demo eval set."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcore.builtin import resolve_model_path
    from ftcore.config import load_config
    from ftcore.data.stream import eval_batches
    from ftcore.model import load_tokenizer
    from ftcore.tasks import task_for

    cfg = load_config(ROOT / "examples/chat-demo.yaml")
    model_dir = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    kl = loss = tokens = 0.0
    with torch.no_grad():
        for batch in eval_batches(cfg.data, tokenizer, 0, 1, 8, task_for(cfg)):
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            trained = batch.labels[:, 1:] != -100
            base_log = torch.log_softmax(base(**inputs).logits[:, :-1][trained].float(), -1)
            tuned_log = torch.log_softmax(tuned(**inputs).logits[:, :-1][trained].float(), -1)
            kl += float((base_log.exp() * (base_log - tuned_log)).sum())
            targets = batch.labels[:, 1:][trained]
            loss += float(torch.nn.functional.nll_loss(tuned_log, targets, reduction="sum"))
            tokens += int(trained.sum())
    return kl / tokens, loss / tokens


def base_kl(work: Path, nproc: int) -> dict:
    result = {}
    for beta in (1.0, 0.0, 10.0):
        out = work / f"base-kl-{beta:g}"
        seconds = launch("examples/lora-base-kl.yaml", out, nproc, f"loss.base_kl={beta}")
        kl, loss = kl_to_base(out / "final")
        result[f"beta_{beta:g}"] = {"kl_to_base_per_token": kl, "eval_loss": loss, "wall_s": round(seconds, 1)}
    for beta in ("1", "10"):
        result[f"kl_ratio_beta_{beta}_vs_0"] = (result[f"beta_{beta}"]["kl_to_base_per_token"]
                                                / result["beta_0"]["kl_to_base_per_token"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="ft-methods-") as tmp:
        work = Path(tmp)
        print(json.dumps({"classification": classification(work, args.nproc),
                          "base_kl": base_kl(work, args.nproc)}, indent=1))


if __name__ == "__main__":
    main()
