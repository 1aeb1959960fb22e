"""`ft export --adapter A --adapter B ... --merge METHOD`: several LoRA adapters merged into one model on their exact
deltas, out of core and verified. linear, task_arithmetic and ties are checked against mergekit's own output for the
same recipe (mergekit merging the single-adapter exports); DARE's seeded masks against the documented rule,
reimplemented here; the refusals name what is wrong; the recipe and each adapter's provenance are recorded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcore.export.combine import MergeRecipe, combine
from ftcore.export.export import ExportError, export_adapter, export_adapters
from tests.conftest import ft_in_process

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(base_dir: str, out: Path, seed: int, targets: list[str] = TARGETS, r: int = 4) -> Path:
    """A PEFT LoRA adapter on the base with random A and B (deltas about as large as the weights, so that the
    merge's choices are far from rounding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_dir
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def adapters(builtin_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(builtin_model_dir, root / f"a{i}", seed=i) for i in range(3)]


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def mergekit(base: str, models: list[Path], method: str, weights: list[float], densities: list[float],
             lambda_: float, out: Path) -> dict[str, torch.Tensor]:
    """mergekit-yaml's merge of the single-adapter exports (its task vectors: each export minus the base)."""
    config = {"merge_method": method, "base_model": base, "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                         for m, w, d in zip(models, weights, densities)]}
    if method != "linear":
        config["parameters"] = {"lambda": lambda_}
    else:
        config["models"].append({"model": base, "parameters": {"weight": 0.0}})  # (linear needs no base)
        config.pop("base_model")
    recipe = out.parent / f"{out.name}.yml"
    recipe.write_text(json.dumps(config))
    proc = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(recipe), str(out),
                           "--no-lazy-unpickle", "--allow-crimes"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return merged_weights(out)


@pytest.fixture(scope="module")
def single_exports(builtin_model_dir, adapters, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("singles")
    outs = []
    for i, adapter in enumerate(adapters):
        out = root / f"m{i}"
        export_adapter(adapter, builtin_model_dir, out, dtype="float32", verify=False, log=lambda _: None)
        outs.append(out)
    return outs


@pytest.mark.parametrize("method, weights, densities, lambda_", [
    ("linear", [0.5, 0.3, 0.2], [1.0] * 3, 1.0),
    ("task_arithmetic", [0.7, -0.4, 0.5], [1.0] * 3, 0.8),
    ("ties", [0.6, 0.3, 0.5], [0.5, 0.3, 0.7], 1.2),
    ("dare_ties", [0.6, 0.3, 0.5], [1.0] * 3, 0.9),  # density 1: no drop, DARE-TIES's sign election and sums
])
def test_the_merge_equals_mergekits_for_the_same_recipe(builtin_model_dir, adapters, single_exports, tmp_path,
                                                         method, weights, densities, lambda_):
    """One pass over the base (verified against base + the combined deltas) gives, tensor for tensor, what mergekit
    gives from the single-adapter exports: equal within fp32 rounding (mergekit's task vectors are export - base,
    ours the exact scale x B @ A), 1e-5 absolute on weights of about 0.02."""
    out = tmp_path / "ours"
    report = export_adapters(adapters, builtin_model_dir, out, MergeRecipe(method, weights, densities, lambda_),
                             dtype="float32", log=lambda _: None)
    from ftcore.export.lora import load_adapter

    pairs = len(load_adapter(adapters[0]).pairs)  # (every block's q, v and down projections)
    assert report.verified == "passed" and report.merged == pairs
    ours = merged_weights(out)
    theirs = mergekit(builtin_model_dir, single_exports, method, weights, densities, lambda_, tmp_path / "mergekit")
    assert ours.keys() <= theirs.keys() | {"lm_head.weight"}
    changed = 0
    for name, tensor in ours.items():
        if name in theirs:
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=name)
            changed += int(any(p in name for p in TARGETS))
    assert changed == pairs


def test_dare_drops_by_the_documented_seeded_rule_whatever_the_order(adapters):
    """DARE keeps an element where a generator seeded by sha256(seed, tensor name, adapter index) draws u < density,
    rescaled by 1 / density; reimplemented here from that rule, the combined delta matches to 1e-6, and it does not
    depend on which tensors were combined before (no shared random state)."""
    from ftcore.export.lora import load_adapter

    loaded = [load_adapter(a) for a in adapters]
    name = sorted(loaded[0].pairs)[0]
    deltas = [a.pairs[name].delta() for a in loaded]
    recipe = MergeRecipe("dare_linear", [0.5, 0.3, 0.2], [0.4, 0.6, 0.8], lambda_=1.5, seed=7)
    got = combine(deltas, recipe, name)
    for other in sorted(loaded[0].pairs)[1:4]:  # other tensors first: the same result for `name`
        combine([a.pairs[other].delta() for a in loaded], recipe, other)
    assert torch.equal(combine(deltas, recipe, name), got)
    want = torch.zeros_like(deltas[0])
    for i, (d, w, rho) in enumerate(zip(deltas, recipe.weights, recipe.densities)):
        digest = hashlib.sha256(f"7\0{name}\0{i}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        keep = torch.rand(d.shape, generator=generator) < rho
        want += w * torch.where(keep, d / rho, 0.0)
        assert abs(keep.float().mean().item() - rho) < 0.02
    torch.testing.assert_close(got, want * 1.5, rtol=1e-6, atol=1e-7)


def test_the_recipe_and_each_adapters_provenance_are_recorded(builtin_model_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    proc = ft_in_process("export", "--adapter", str(adapters[0]), "--adapter", str(adapters[1]), "--merge", "ties",
                         "--weight", "0.7", "--weight", "0.3", "--density", "0.5", "--base", builtin_model_dir,
                         "--out", str(out), "--dtype", "float32")
    assert "merging 2 adapters (ties" in proc.stdout and "verification: passed" in proc.stdout, proc.stdout
    record = json.loads((out / "merge_recipe.json").read_text())
    assert record["method"] == "ties" and record["weights"] == [0.7, 0.3] and record["densities"] == [0.5, 0.5]
    assert [a["sha256"] for a in record["adapters"]] == [
        hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest() for a in adapters[:2]]


@pytest.mark.parametrize("args, message", [
    (["--merge", "ties"], "--merge combines two or more"),
    (["--adapter", "{a1}"], "2 adapters need --merge"),
    (["--adapter", "{a1}", "--merge", "slerp"], "--merge slerp: expected one of linear"),
    (["--adapter", "{a1}", "--merge", "ties", "--weight", "1", "--weight", "2", "--weight", "3"],
     "--weight: 3 values for 2 adapters"),
    (["--adapter", "{a1}", "--merge", "ties", "--density", "1.5"], "--density .* must be in \\(0, 1\\]"),
    (["--adapter", "{other}", "--merge", "linear"], "adapt different modules"),
])
def test_a_merge_that_cannot_be_done_is_refused_in_one_line(builtin_model_dir, adapters, tmp_path, args, message):
    other = make_adapter(builtin_model_dir, tmp_path / "other", seed=9, targets=["k_proj"])
    args = [a.format(a1=adapters[1], other=other) for a in args]
    proc = ft_in_process("export", "--adapter", str(adapters[0]), *args, "--base", builtin_model_dir, "--out",
                         str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    line = (proc.stderr or proc.stdout).strip().splitlines()[-1]
    assert __import__("re").search(message, line), line
    assert not (tmp_path / "out").exists()


def test_adapters_trained_on_different_bases_are_refused(builtin_model_dir, adapters, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in adapters[1].iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-base"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="was trained on some/other-base.*must share their base"):
        export_adapters([adapters[0], moved], None, tmp_path / "out", MergeRecipe("linear", [1, 1], [1, 1]),
                        log=lambda _: None)
