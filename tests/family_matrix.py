"""The architecture matrix, run in ONE process (python -m tests.family_matrix OUT_DIR [FAMILY...]) so 18 families x
(LoRA, QLoRA) runs do not each pay the interpreter and DeepSpeed start-up: for each family, the real recipe
(`ftcore.train.run`, ZeRO-0, a world of one) trains 2 LoRA steps, 2 full fine-tuning steps and 2 QLoRA steps;
`ft export` merges each adapter and exports the full run's checkpoint (verification on); the LoRA export is
compared with PEFT's merge_and_unload in fp32, the checkpoint export with the run's own final/. One JSON line a
family goes to OUT_DIR/results.jsonl; tests/test_families.py asserts on it. `OUT_DIR --qlora-dtypes` runs the
QLoRA storage x compute dtype combinations instead (OUT_DIR/qlora_dtypes.jsonl)."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def reset_between_runs() -> None:
    """accelerate keeps its state in process-wide singletons: a second recipe in the same process needs them
    cleared. The process group (a world of one) stays up for all runs: DeepSpeed caches its groups."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(model_dir: Path, out: Path, method: str, dtype: str = "float32") -> list[float]:
    from ftcore.config import load_config
    from ftcore.train import Recipe

    cfg = load_config(None, [f"output_dir={out}", f"model.name_or_path={model_dir}", f"model.dtype={dtype}",
                             f"adapter.method={method}", "adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.0",
                             "data.max_seq_len=48", "train.micro_batch_size=2", "train.max_steps=2",
                             "optimizer.lr=1e-2", "distributed.zero_stage=0", "data.audit=true",
                             "logging.report_to=none"])
    reset_between_runs()
    recipe = Recipe(cfg, resume="none")  # ftcore.train.run, less its destroy_process_group (see above)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.close()
    return [json.loads(line)["loss"] for line in (out / "audit" / "rank0.jsonl").read_text().splitlines()]


def peft_merge_max_diff(model_dir: Path, adapter_dir: Path, export_dir: Path) -> tuple[float, int]:
    """Largest |export - PEFT merge_and_unload| over every tensor, and how many tensors the adapter changed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    # Loaded back through transformers: on disk some families keep their legacy layout (mixtral's per-expert
    # w1/w2/w3), which transformers converts on load exactly as it converts the base.
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).state_dict()
    assert exported.keys() == merged.keys(), sorted(set(exported) ^ set(merged))[:4]
    worst, changed = 0.0, 0
    for name, tensor in exported.items():
        worst = max(worst, (tensor - merged[name]).abs().max().item())
        changed += int(not torch.equal(original[name], merged[name]))
    return worst, changed


def same_weights(a: Path, b: Path) -> bool:
    """Two model directories hold the same weights once loaded (full fine-tuning's final/ vs the checkpoint's
    export)."""
    import torch
    from transformers import AutoModelForCausalLM

    x, y = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict() for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def one_family(name: str, root: Path, tokenizer_dir: str) -> dict:
    from ftcore.export.export import export_adapter, export_checkpoint
    from tests.families import build_family

    model_dir = build_family(name, root / name / "base", tokenizer_dir)
    result: dict = {"family": name}
    lora_losses = train(model_dir, root / name / "lora", "lora")
    report = export_adapter(root / name / "lora" / "final", None, root / name / "lora-merged", log=lambda _: None)
    diff, changed = peft_merge_max_diff(model_dir, root / name / "lora" / "final", root / name / "lora-merged")
    result.update(lora_losses=lora_losses, lora_verified=report.verified, lora_relative_diff=report.relative_diff,
                  peft_max_abs_diff=diff, peft_changed_tensors=changed)
    full_losses = train(model_dir, root / name / "full", "full")
    checkpoint = root / name / "full" / "checkpoints" / "step-000002"
    report = export_checkpoint(checkpoint, None, root / name / "full-export", log=lambda _: None)
    result.update(full_losses=full_losses, full_verified=report.verified, full_relative_diff=report.relative_diff,
                  full_final_equals_export=same_weights(root / name / "full" / "final", root / name / "full-export"))
    if name == "falcon":  # transformers' 4-bit loading converts no FalconLinear: refused, by name, at load
        from ftcore.model import ModelError

        try:
            train(model_dir, root / name / "qlora", "qlora")
        except ModelError as e:
            result["qlora_refused"] = str(e)
        return result
    qlora_losses = train(model_dir, root / name / "qlora", "qlora", dtype="bfloat16")
    report = export_adapter(root / name / "qlora" / "final", None, root / name / "qlora-merged", log=lambda _: None)
    result.update(qlora_losses=qlora_losses, qlora_verified=report.verified,
                  qlora_relative_diff=report.relative_diff)
    return result


def qlora_dtype_combinations(root: Path, tokenizer_dir: str) -> list[dict]:
    """QLoRA on a llama base stored in fp32 / bf16 / fp16, trained with bf16 / fp32 compute; each adapter exported
    at the base's dtype (the default) and at fp32, verification on."""
    from ftcore.export.export import export_adapter
    from tests.families import build_family

    records = []
    for storage in ("float32", "bfloat16", "float16"):
        model_dir = build_family("llama", root / f"base-{storage}", tokenizer_dir, dtype=storage)
        for compute in ("bfloat16", "float32"):
            run_dir = root / f"qlora-{storage}-{compute}"
            record: dict = {"storage": storage, "compute": compute}
            try:
                record["losses"] = train(model_dir, run_dir, "qlora", dtype=compute)
                for out_dtype in (None, "float32"):
                    report = export_adapter(run_dir / "final", None, run_dir / f"merged-{out_dtype}", dtype=out_dtype,
                                            log=lambda _: None)
                    record[f"export_{out_dtype or 'default'}"] = {"verified": report.verified,
                                                                  "relative_diff": report.relative_diff}
            except Exception as e:
                record["error"] = f"{type(e).__name__}: {e}"
            records.append(record)
    return records


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    root = Path(sys.argv[1])
    from ftcore.builtin import resolve_model_path
    from tests.families import FAMILIES

    tokenizer_dir = resolve_model_path("builtin:tiny-llama")
    if sys.argv[2:] == ["--qlora-dtypes"]:
        with open(root / "qlora_dtypes.jsonl", "a") as results:
            for record in qlora_dtype_combinations(root, tokenizer_dir):
                results.write(json.dumps(record) + "\n")
        return
    with open(root / "results.jsonl", "a") as results:
        for name in sys.argv[2:] or list(FAMILIES):
            try:
                record = one_family(name, root, tokenizer_dir)
            except Exception as e:  # recorded, so the test for this family fails with the reason
                record = {"family": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            results.write(json.dumps(record) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
