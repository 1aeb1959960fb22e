"""`ft export` of adapters: shard-by-shard merge equals PEFT's merge_and_unload (fp32, bit-exact) on a Llama and
a Qwen2 model built from configs; QLoRA merges onto the NF4 round trip; errors and atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from ftcore.export.export import ExportError, export_adapter
from ftcore.export.output import check_disk_space
from tests.conftest import ft_in_process

ARCHS = {
    "llama": lambda: LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def build_base(directory: Path, arch: str, shard: str = "60KB", **overrides) -> Path:
    torch.manual_seed(0)
    config = ARCHS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size=shard)  # several shards, as real checkpoints have
    assert len(list(directory.glob("*.safetensors"))) > 1
    return directory


def build_adapter(base_dir: Path, out: Path, **lora) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)  # random A and B: a real delta
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return peft_model


def exported_state(out: Path) -> dict:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = {}
    for filename in sorted(set(index["weight_map"].values())):
        state.update(load_file(out / filename))
    assert set(state) == set(index["weight_map"])
    return state


LORA_VARIANTS = {
    "all_linear_rslora_patterns": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                                       alpha_pattern={"v_proj": 4}, rank_pattern={"v_proj": 2}),
    "attention_mlp_modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                          modules_to_save=["o_proj"]),
    "embeddings_and_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "k_proj"]),
}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_equals_peft_merge_and_unload(tmp_path, arch, variant):
    base = build_base(tmp_path / "base", arch)
    peft_model = build_adapter(base, tmp_path / "adapter", **LORA_VARIANTS[variant])
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids).logits
    report = export_adapter(tmp_path / "adapter", str(base), tmp_path / "out", shard_size="50KB", log=print)
    assert report.verified == "passed" and report.merged > 0
    got = exported_state(tmp_path / "out")
    assert len(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) == len(got)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained_logits, rtol=1e-5, atol=1e-5)

    tied = ARCHS[arch]().tie_word_embeddings and variant == "embeddings_and_head"
    if tied:
        # PEFT would merge both deltas into the one shared matrix (changing the function); ft unties instead.
        assert loaded.config.tie_word_embeddings is False and "lm_head.weight" in got
        return
    merged = peft_model.merge_and_unload().state_dict()
    for name, tensor in got.items():
        assert torch.equal(tensor, merged[name]), name  # bit-exact, fp32


def test_a_wrong_merge_is_caught_and_the_first_diverging_block_named(tmp_path, monkeypatch):
    """One merged tensor perturbed (a bug in the merge, simulated): the layer-by-layer check fails, names the block
    whose output first diverges, and nothing is written."""
    from ftcore.export.lora import Adapter

    base = build_base(tmp_path / "base", "llama", num_hidden_layers=4)
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    merged = Adapter.apply

    def wrong(self, name, tensor):
        out = merged(self, name, tensor)
        return out * 1.01 if name == "model.layers.2.mlp.down_proj.weight" else out

    monkeypatch.setattr(Adapter, "apply", wrong)
    lines = []
    with pytest.raises(ExportError, match=r"verification failed: .* first diverging at block 2 \(hidden states "):
        export_adapter(tmp_path / "adapter", str(base), tmp_path / "out", log=lines.append)
    assert any("layer by layer (4 blocks)" in line for line in lines), lines
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_output_dtype_and_shards(tmp_path):
    base = build_base(tmp_path / "base", "llama")
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    report = export_adapter(tmp_path / "adapter", str(base), tmp_path / "out", dtype="bfloat16", shard_size="40KB")
    state = exported_state(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 4 and all(s.stat().st_size < 60_000 for s in shards)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and report.relative_diff < 5e-2


def test_adapter_from_training_exports_via_cli(tmp_path, builtin_model_dir):
    """The path a user takes after `ft train`: the final/ adapter dir names its base in ft_config.yaml."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "final")
    (tmp_path / "final" / "ft_config.yaml").write_text("model:\n  name_or_path: builtin:tiny-llama\n"
                                                      "adapter:\n  method: lora\n")
    proc = ft_in_process("export", "--adapter", str(tmp_path / "final"), "--out", str(tmp_path / "merged"))
    assert "verification: passed" in proc.stdout and "max abs diff" in proc.stdout
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # tokenizer files come along
    proc = ft_in_process("export", "--adapter", str(tmp_path / "final"), "--out", str(tmp_path / "merged"), check=False)
    assert proc.returncode == 1 and "merged: already exists (use --force to replace it)" in proc.stderr


def test_qlora_adapter_merges_onto_the_nf4_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernels need input widths that are multiples of its block size (64).
    base = build_base(tmp_path / "base", "llama", intermediate_size=128)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "ft_config.yaml").write_text(
        f"model:\n  name_or_path: {base}\n  dtype: float32\nadapter:\n  method: qlora\n")
    report = export_adapter(tmp_path / "adapter", None, tmp_path / "out")
    assert report.merge_base.startswith("quantized") and report.verified == "passed"
    assert report.relative_diff < 1e-5
    # Merged onto the original weights instead (on request), the export is a different function from the one
    # trained: that is why quantized is the default for QLoRA.
    notes = []
    export_adapter(tmp_path / "adapter", None, tmp_path / "out2", merge_base="original", log=notes.append)
    assert any("trained on a 4-bit base; it is merged onto the original weights" in n for n in notes)
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(tmp_path / "out2")(input_ids=ids).logits
    assert (quantized - original).abs().max() > 100 * report.max_abs_diff
    from ftcore.export.base import BaseModel, quantized_weight_names

    names, transposed = quantized_weight_names(BaseModel(base))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names and not transposed


def test_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    base = build_base(tmp_path / "base", "llama")
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])

    other = tmp_path / "other"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ExportError, match=r"adapter does not fit the base .*other: model.layers.0.mlp.gate_proj "
                                          r"is \[96, 32\] there, the adapter was trained on \[96, 64\]"):
        export_adapter(tmp_path / "adapter", str(other), tmp_path / "out")

    deeper = build_base(tmp_path / "deeper", "llama", num_hidden_layers=3)
    build_adapter(deeper, tmp_path / "deeper_adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ExportError, match=r"adapter targets model.layers.2.self_attn.q_proj, which the base .*base "
                                          r"does not have \(is it the base the adapter was trained on\?\)"):
        export_adapter(tmp_path / "deeper_adapter", str(base), tmp_path / "out")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="use_dora=True cannot be merged exactly"):
        export_adapter(tmp_path / "dora", str(base), tmp_path / "out")

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ExportError, match=rf"{shard.name}: truncated"):
        export_adapter(tmp_path / "adapter", str(broken), tmp_path / "out")
    shard.unlink()
    with pytest.raises(ExportError, match=rf"{shard.name}: missing \(listed in model.safetensors.index.json\)"):
        export_adapter(tmp_path / "adapter", str(broken), tmp_path / "out")

    with pytest.raises(ExportError, match="not enough disk space: the export needs"):
        check_disk_space(tmp_path, needed=shutil.disk_usage(tmp_path).free * 2)

    # A failure after shards were written (here: verification of an adapter holding a NaN) leaves no output and
    # no staging directory behind.
    from safetensors.torch import save_file

    (tmp_path / "nan").mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", tmp_path / "nan")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan" / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="verification failed: .* differ from base \\+ adapter by nan"):
        export_adapter(tmp_path / "nan", str(base), tmp_path / "out")
    assert not (tmp_path / "out").exists()

    (tmp_path / "a_file").write_text("not a directory")  # unwritable even for root
    with pytest.raises(ExportError, match="a_file: cannot write the export there"):
        export_adapter(tmp_path / "adapter", str(base), tmp_path / "a_file" / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    with pytest.raises(ExportError, match="--shard-size '5 gigs': expected a size such as 5GB"):
        export_adapter(tmp_path / "adapter", str(base), tmp_path / "out", shard_size="5 gigs")


def test_force_replaces_an_existing_export_atomically(tmp_path):
    base = build_base(tmp_path / "base", "llama")
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous export")
    with pytest.raises(ExportError, match="already exists"):
        export_adapter(tmp_path / "adapter", str(base), tmp_path / "out")
    assert (tmp_path / "out" / "old.txt").is_file()  # untouched
    export_adapter(tmp_path / "adapter", str(base), tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
