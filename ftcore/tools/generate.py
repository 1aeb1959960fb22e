"""Greedy generation from a training output: a PEFT adapter dir (loaded onto its base) or a full model dir."""

from __future__ import annotations

from pathlib import Path

import torch

from ftcore.builtin import is_builtin, resolve_model_path
from ftcore.data.chat_template import render
from ftcore.gguf_base import gguf_file
from ftcore.model_files import BaseModelError, check_model_dir


def load_for_inference(model_dir: str) -> tuple[torch.nn.Module, object]:
    """A final/ dir (PEFT adapter or full model) and its tokenizer, ready to generate on this machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_builtin(model_dir) or gguf_file(model_dir) is not None:  # a base model: built in, or a GGUF file
        model_dir = resolve_model_path(model_dir)
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"--model {model_dir}: no such directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base_dir = resolve_model_path(PeftConfig.from_pretrained(path).base_model_name_or_path)
            if Path(base_dir).is_dir():
                check_model_dir(base_dir)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            try:
                model = PeftModel.from_pretrained(base, path)
            except (RuntimeError, ValueError, KeyError) as e:  # e.g. size mismatch: the adapter is another base's
                raise ValueError(f"--model {model_dir}: the adapter does not fit its base {base_dir}: "
                                 f"{_first_line(e)}") from None
        else:
            check_model_dir(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except BaseModelError as e:
        raise ValueError(str(e)) from None
    return model.eval(), tokenizer


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # torch's size-mismatch report puts the useful line after a header line
    useful = [line for line in lines if "size mismatch" in line]
    return (useful or lines or [type(error).__name__])[0]


@torch.no_grad()
def generate(model_dir: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to `prompts`, each rendered with the model's chat template."""
    model, tokenizer = load_for_inference(model_dir)
    answers = []
    for prompt in prompts:
        text = render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
