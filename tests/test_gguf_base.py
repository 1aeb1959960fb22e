"""A GGUF file as the base model: dequantized once (exactly, for F32; within its type's bound for Q8_0) with its
tokenizer and chat template, cached by sha256 and never used half-written, planned without dequantizing, trained
on, exported onto what was trained, and refused when the file changed since training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ft_in_process, read_jsonl, run_ft, tiny_run_args
from tests.gguf_files import write_llama_gguf, write_raw_gguf

TEMPLATE = ("{% for m in messages %}{{ '<<' + m['role'] + '>> ' + m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<<assistant>> ' }}"
            "{% endif %}")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, builtin_model_dir) -> Path:
    return write_llama_gguf(Path(builtin_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "F32",
                            chat_template=TEMPLATE)


def test_a_gguf_base_dequantizes_once_to_the_same_weights_tokenizer_and_template(f32_gguf, builtin_model_dir):
    from transformers import AutoTokenizer

    from ftcore.builtin import resolve_model_path
    from ftcore.gguf_base import MARKER, file_sha256

    built = Path(resolve_model_path(str(f32_gguf)))
    marker = json.loads((built / MARKER).read_text())
    assert marker["sha256"] == file_sha256(f32_gguf) and marker["dtype"] == "float32"
    original, dequantized = load_file(f"{builtin_model_dir}/model.safetensors"), load_file(built / "model.safetensors")
    assert original.keys() == dequantized.keys()
    for name in original:  # F32 in, F32 out: the q/k rotary permutation undone, every value equal
        assert torch.equal(original[name], dequantized[name]), name
    theirs, ours = AutoTokenizer.from_pretrained(builtin_model_dir), AutoTokenizer.from_pretrained(built)
    text = "Fine-tune 70B models, then export: 1234 €."
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.chat_template == TEMPLATE  # the GGUF's own template (transformers' loader drops it)
    # Cached: the same directory, not rebuilt; a directory the marker does not vouch for is rebuilt, never used.
    stamp = (built / MARKER).stat().st_mtime_ns
    assert resolve_model_path(str(f32_gguf)) == str(built) and (built / MARKER).stat().st_mtime_ns == stamp
    (built / MARKER).unlink()  # as a kill mid-build would leave it (the marker is written last)
    (built / "model.safetensors").write_bytes(b"half")
    assert resolve_model_path(str(f32_gguf)) == str(built)
    assert torch.equal(load_file(built / "model.safetensors")["lm_head.weight"], original["lm_head.weight"])
    # A directory holding one .gguf names it as well.
    assert resolve_model_path(str(f32_gguf.parent)) == str(built)


def test_our_header_reader_agrees_with_ggufs_own_reader(f32_gguf, tmp_path, builtin_model_dir):
    """ft reads GGUF headers itself (gguf's GGUFReader parses every vocabulary entry: tens of seconds at 262k)."""
    from gguf import GGUFReader

    from ftcore.gguf_base import gguf_header

    quantized = write_llama_gguf(Path(builtin_model_dir), tmp_path / "q4k.gguf", "Q4_K")
    for path in (f32_gguf, quantized):
        ours, theirs = gguf_header(path), GGUFReader(str(path))
        assert ours.tensor_types == {t.name: t.tensor_type.name for t in theirs.tensors}
        assert ours.shapes == {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in theirs.tensors}
        assert ours.metadata["llama.block_count"] == 4 and ours.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert gguf_header(f32_gguf).chat_template == TEMPLATE
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f32_gguf.read_bytes()[:4096])
    with pytest.raises(ValueError, match="it ends inside its header"):
        gguf_header(truncated)


def test_a_quantized_gguf_dequantizes_within_its_type_bound(tmp_path, builtin_model_dir):
    from ftcore.builtin import resolve_model_path

    path = write_llama_gguf(Path(builtin_model_dir), tmp_path / "tiny-q8.gguf", "Q8_0")
    built = Path(resolve_model_path(str(path)))
    assert json.loads((built / "ft_gguf.json").read_text())["tensor_types"] == {"Q8_0": 26, "F32": 13}
    original, dequantized = load_file(f"{builtin_model_dir}/model.safetensors"), load_file(built / "model.safetensors")
    for name, w in original.items():
        # Q8_0: blocks of 32 values share one fp16 scale max|w|/127, so each value is within half a step of it.
        assert (dequantized[name] - w).abs().max() <= w.abs().max() / 127 * 0.51, name


def test_unreadable_gguf_files_are_one_line_errors(tmp_path):
    unknown_arch = write_raw_gguf(tmp_path / "foo.gguf", "foo")
    unknown_type = write_raw_gguf(tmp_path / "q81.gguf", "llama", "Q8_1")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    cases = {unknown_arch: "GGUF architecture 'foo' cannot be read by transformers",
             unknown_type: "quant type Q8_1 (e.g. tensor token_embd.weight) cannot be dequantized",
             tmp_path / "junk.gguf": "not a readable GGUF file",
             tmp_path / "missing.gguf": "does not exist",
             tmp_path / "two": "holds several .gguf files (a.gguf, b.gguf)"}
    for path, message in cases.items():
        proc = ft_in_process("plan", "examples/chat-demo.yaml", "--gpus-per-node", "2", "--set",
                             f"model.name_or_path={path}", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (path, proc.stderr)


def test_ft_plan_reads_a_gguf_without_dequantizing_it(f32_gguf, builtin_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "empty-cache"))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(f32_gguf.read_bytes())
    args = ["examples/chat-demo.yaml", "--json", "--gpus-per-node", "2"]
    planned = json.loads(ft_in_process("plan", *args, "--set", f"model.name_or_path={copy}").stdout)
    reference = json.loads(ft_in_process("plan", *args, "--set", f"model.name_or_path={builtin_model_dir}").stdout)
    assert planned == reference
    assert not list((tmp_path / "empty-cache" / "gguf").glob("*-float32"))  # nothing was dequantized


@pytest.mark.trains
def test_train_export_eval_generate_on_a_gguf_base_and_refuse_a_changed_file(tmp_path, builtin_model_dir):
    from ftcore.gguf_base import file_sha256

    path = write_llama_gguf(Path(builtin_model_dir), tmp_path / "base.gguf", "Q8_0")
    sha = file_sha256(path)
    out = tmp_path / "run"
    args = tiny_run_args(out, "--set", f"model.name_or_path={path}", "--set", "train.max_steps=4",
                         "--set", "data.audit=false", "--set", "evaluation.every=0")
    run_ft("train", *args)
    for where in (out, out / "final"):
        assert json.loads((where / "base_model.json").read_text())["sha256"] == sha
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["base_model"]["sha256"] == sha
    proc = ft_in_process("export", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged"))
    said = f"base: {path.resolve()} (sha256 {sha[:16]}..., the file the run trained on), merged onto its float32 "
    assert said + "dequantization as trained" in proc.stdout + proc.stderr
    # ft eval and ft generate take the GGUF as a model, like a directory.
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    ft_in_process("eval", str(path), "--data", str(data), "--max-new-tokens", "3", "--out", str(tmp_path / "ev"))
    assert len(read_jsonl(tmp_path / "ev" / "predictions.jsonl")) == 1
    assert ft_in_process("generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "3").returncode == 0
    # The file changes under the same name: resume and export both refuse, naming the file and both hashes.
    write_llama_gguf(Path(builtin_model_dir), path, "Q8_0", weights_scale=0.5)
    new = file_sha256(path)
    proc = run_ft("train", *args[:-4], "--set", "train.max_steps=6", check=False)
    said = (f"was trained on a different base: model.name_or_path {path.resolve()} now has sha256 {new[:16]}..., "
            f"the checkpoint's was {sha[:16]}...")
    assert proc.returncode == 1 and said in proc.stderr, proc.stderr[-3000:]
    proc = ft_in_process("export", "--adapter", str(out / "final"), "--out", str(tmp_path / "again"), check=False)
    assert proc.returncode != 0 and "the file changed since training" in proc.stderr, proc.stderr
    assert not (tmp_path / "again").exists()
