"""A broken base (config.json and weights disagree, a missing shard, an adapter trained on another model) is one
line from ft export, ft train and ft generate, and nothing is written where the output would go. ft plan needs only
the model's config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ft_in_process, run_ft


@pytest.fixture(scope="module")
def bases(tmp_path_factory, builtin_model_dir) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.families import build_family

    root = tmp_path_factory.mktemp("broken")
    mismatch = root / "mismatch"
    shutil.copytree(builtin_model_dir, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] *= 2
    (mismatch / "config.json").write_text(json.dumps(config))

    sharded = root / "missing-shard"
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="5MB")
    shutil.copy(Path(builtin_model_dir) / "tokenizer.json", sharded)
    shutil.copy(Path(builtin_model_dir) / "tokenizer_config.json", sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()

    adapter = root / "llama-adapter"
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    shutil.copy(Path(builtin_model_dir) / "tokenizer.json", adapter)
    shutil.copy(Path(builtin_model_dir) / "tokenizer_config.json", adapter)
    other = build_family("qwen3", root / "qwen3", builtin_model_dir)  # another architecture and shapes
    on_other = root / "adapter-on-other-base"
    shutil.copytree(adapter, on_other)
    adapter_config = json.loads((on_other / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(other)
    (on_other / "adapter_config.json").write_text(json.dumps(adapter_config))
    return {"mismatch": mismatch, "sharded": sharded, "missing": shards[-1], "adapter": adapter, "other": other,
            "on_other": on_other}


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


MISMATCH = "config.json and the weights disagree: model.layers.0.mlp.down_proj.weight is"


def test_config_and_weights_disagree(bases, tmp_path):
    base = bases["mismatch"]
    out = tmp_path / "merged"
    line = one_line_error(ft_in_process("export", "--adapter", str(bases["adapter"]), "--base", str(base),
                                        "--out", str(out), check=False))
    assert line.startswith(f"error: {base}: {MISMATCH}") and "config.json makes it" in line
    assert not out.exists() and not list(tmp_path.iterdir())
    line = one_line_error(ft_in_process("generate", "--model", str(base), "--prompt", "hi", check=False))
    assert MISMATCH in line
    run_dir = tmp_path / "run"
    line = one_line_error(run_ft("train", "--set", f"model.name_or_path={base}", "--set", f"output_dir={run_dir}",
                                 "--set", "train.max_steps=1", "--set", "distributed.zero_stage=0", check=False,
                                 trains=False))
    assert line.startswith(f"error: model.name_or_path: {base}: {MISMATCH}")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final").exists()


def test_a_missing_shard(bases, tmp_path):
    base, missing = bases["sharded"], bases["missing"]
    expected = f"{missing}: missing (listed in model.safetensors.index.json)"
    out = tmp_path / "merged"
    line = one_line_error(ft_in_process("export", "--adapter", str(bases["adapter"]), "--base", str(base),
                                        "--out", str(out), check=False))
    assert line == f"error: {expected}" and not out.exists()
    assert one_line_error(ft_in_process("generate", "--model", str(base), "--prompt", "hi", check=False)) == \
        f"error: {expected}"
    line = one_line_error(run_ft("train", "--set", f"model.name_or_path={base}", "--set",
                                 f"output_dir={tmp_path / 'run'}", "--set", "distributed.zero_stage=0", check=False,
                                 trains=False))
    assert line == f"error: model.name_or_path: {expected}"


def test_an_adapter_of_another_architecture(bases, tmp_path):
    out = tmp_path / "merged"
    line = one_line_error(ft_in_process("export", "--adapter", str(bases["adapter"]), "--base",
                                        str(bases["other"]), "--out", str(out), check=False))
    assert line.startswith("error: adapter does not fit the base") and not out.exists()
    line = one_line_error(ft_in_process("generate", "--model", str(bases["on_other"]), "--prompt", "hi", check=False))
    assert line.startswith(f"error: --model {bases['on_other']}: the adapter does not fit its base")


def test_plan_needs_only_the_model_config(tmp_path):
    """Data that does not exist yet is not checked by ft plan (it reads model config.json and data.max_seq_len)."""
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("model: {name_or_path: examples/models/llama-2-7b}\n"
                   "data: {train: [{path: /nowhere/train.jsonl}], max_seq_len: 1024}\n")
    proc = ft_in_process("plan", str(cfg), "--gpus-per-node", "2", "--gpu-mem-gb", "40", "--json")
    plan = json.loads(proc.stdout)
    assert plan["recommendation"] is not None
    # ...but the model must be there: a wrong model path is still one line.
    proc = ft_in_process("plan", str(cfg), "--gpus-per-node", "2", "--set", "model.name_or_path=/nowhere/model",
                         check=False)
    assert proc.returncode == 2 and "model.name_or_path: /nowhere/model does not exist" in proc.stderr


def test_the_check_runs_inside_a_zero3_process(bases, builtin_model_dir):
    """Under ZeRO-3 the trainer holds an HfDeepSpeedConfig before it loads the base, and transformers then builds
    every model inside deepspeed.zero.Init; the check's shape model must not be one of them (it is on the meta
    device, which zero.Init cannot partition)."""
    from transformers.integrations import HfDeepSpeedConfig

    from ftcore.model_files import BaseModelError, check_model_dir

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert zero3.is_zero3()
    check_model_dir(builtin_model_dir)
    with pytest.raises(BaseModelError, match="intermediate_size|disagree"):
        check_model_dir(bases["mismatch"])
    del zero3
