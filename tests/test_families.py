"""Every common causal-LM family trains with LoRA, QLoRA and full fine-tuning and exports exactly (tiny configs built
here; the runs are the real recipe and `ft export`, in one process: tests/family_matrix.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.families import FAMILIES, MOE_FAMILIES, build_family

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]  # real training runs (in one child process)


def _drive(out, *args) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.family_matrix", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("families")
    _drive(out)
    return {r["family"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_lora_and_qlora_and_exports_exactly(matrix, family):
    result = matrix[family]
    assert "error" not in result, result.get("traceback", result.get("error"))
    # 2 LoRA steps trained (the loss moved), and the export is PEFT's merge_and_unload to the bit in fp32.
    assert len(result["lora_losses"]) == 2 and result["lora_losses"][1] != result["lora_losses"][0]
    assert result["peft_max_abs_diff"] == 0.0 and result["peft_changed_tensors"] > 0
    assert result["lora_verified"] == "passed" and result["lora_relative_diff"] < 1e-4
    # Full fine-tuning: 2 steps; the checkpoint's export verifies and equals the run's own final/ model.
    assert len(result["full_losses"]) == 2 and result["full_verified"] == "passed"
    assert result["full_final_equals_export"]
    if family == "falcon":
        # transformers' 4-bit loading converts no FalconLinear: QLoRA would silently be LoRA on a full base.
        assert result["qlora_refused"].startswith("adapter.method: qlora, but bitsandbytes quantized none")
        return
    assert len(result["qlora_losses"]) == 2
    # Trained with bf16 compute on an fp32-stored base, exported at the base's dtype: verifies at fp32 tolerance.
    assert result["qlora_verified"] == "passed" and result["qlora_relative_diff"] < 1e-4


def test_qlora_export_verifies_for_every_storage_and_compute_dtype(tmp_path):
    """The verification compares like with like: the export and base + adapter on the NF4 base as training saw
    it. Tolerance (relative to the largest logit): 1e-4 for an fp32 export, 1e-2 fp16, 5e-2 bf16."""
    _drive(tmp_path, "--qlora-dtypes")
    records = [json.loads(line) for line in (tmp_path / "qlora_dtypes.jsonl").read_text().splitlines()]
    assert {(r["storage"], r["compute"]) for r in records} == {
        (s, c) for s in ("float32", "bfloat16", "float16") for c in ("bfloat16", "float32")}
    tolerance = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
    for r in records:
        assert "error" not in r, r
        assert r["export_float32"]["verified"] == "passed" and r["export_float32"]["relative_diff"] < 1e-4, r
        default = r["export_default"]  # at the base's storage dtype
        assert default["verified"] == "passed" and default["relative_diff"] < tolerance[r["storage"]], r


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_lora_adapts_attention_by_default_and_experts_on_request(tmp_path, builtin_model_dir, family):
    """Default: attention (and dense layers) only, router never; adapter.moe_experts puts LoRA on the fused expert
    weights (dropout must be 0, said in one line); adapter.moe_router adds the router."""
    import torch

    from ftcore.config import AdapterConfig, Config
    from ftcore.model import ModelError, load_model

    base = build_family(family, tmp_path / family, builtin_model_dir)

    def trained(**adapter) -> set[str]:
        cfg = Config(adapter=AdapterConfig(**adapter))
        cfg.train.seed = 0
        model = load_model(cfg, str(base), torch.device("cpu"))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    default = trained(dropout=0.05)
    assert default and all(".self_attn." in n for n in default)
    experts = trained(moe_experts=True, dropout=0.0)
    assert any(".experts." in n for n in experts) and not any(".gate.lora" in n for n in experts)
    router = trained(moe_experts=True, moe_router=True, dropout=0.0)
    assert any(".gate." in n for n in router - experts)
    with pytest.raises(ModelError, match=r"^adapter.dropout: 0.05, but LoRA on fused MoE expert weights"):
        trained(moe_experts=True, dropout=0.05)


def test_attention_auto_picks_what_the_model_supports(tmp_path, builtin_model_dir):
    from ftcore.model import ModelError, model_class_for, resolve_attn_implementation

    gemma2 = model_class_for(str(build_family("gemma2", tmp_path / "gemma2", builtin_model_dir)))
    llama = model_class_for(builtin_model_dir)
    assert resolve_attn_implementation("auto", cuda=False, model_class=gemma2) == "eager"  # no sdpa in Gemma-2
    assert resolve_attn_implementation("auto", cuda=False, model_class=llama) == "sdpa"
    with pytest.raises(ModelError, match="Gemma2ForCausalLM does not support sdpa"):
        resolve_attn_implementation("sdpa", cuda=False, model_class=gemma2)
