"""Preference pairs: a record {prompt, chosen, rejected} -> two tokenized samples that share the prompt, and the
batch that holds them (task preference).

Each field may be plain text or a list of chat turns (the shapes of UltraFeedback- and TRL-style datasets):
- all plain text: BOS + prompt, then the response + EOS (raw text, as format prompt_completion);
- any of them turns: the conversation prompt + response rendered with the model's chat template; a text prompt
  is one user turn and a text response one assistant turn. Without a prompt field, chosen and rejected are whole
  conversations and their common leading turns are the prompt. A response must be one assistant turn.
Only the response tokens train (the prompt's labels are -100).

Truncation to data.max_seq_len (L), so that both responses stay comparable: when the prompt plus the longer
response exceeds L, the prompt loses tokens from its start (its first token kept when it is BOS) down to
L - longer response, but never below min(prompt, L // 2) tokens; then each response is cut at its end to fit
what is left. Both responses always follow the same prompt tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ftcore.data.batch import Batch, collate
from ftcore.data.chat_template import assistant_char_spans
from ftcore.data.formats import IGNORE_INDEX, RecordError, RecordSpec, Tokenized, _bos_eos, parse_turns


@dataclass
class Pair:
    """One preference record, tokenized: the chosen and the rejected sample (same prompt tokens)."""

    chosen: Tokenized
    rejected: Tokenized
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        """Response tokens of both samples."""
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _prompt_and_response(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first], ids[first:], labels[first:]


def _chat_sample(tokenizer: Any, prompt: list[dict], response: list[dict], name: str) -> tuple[list, list, list]:
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise RecordError(f"preference field {name!r} must be one assistant turn (got "
                          f"{'/'.join(m['role'] for m in response) or 'none'})")
    try:
        text, spans = assistant_char_spans(tokenizer, prompt + response, "last_assistant")
    except ValueError as e:
        raise RecordError(str(e)) from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) and b > a else IGNORE_INDEX
              for t, (a, b) in zip(ids, enc["offset_mapping"])]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError(f"preference field {name!r} renders to no response tokens")
    return _prompt_and_response(ids, labels)


def _turns_or_text(record: dict, name: str, spec: RecordSpec, optional: bool = False):
    value = record.get(name)
    if value is None and optional:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return parse_turns(value, name, spec)
    got = "missing" if name not in record else type(value).__name__
    raise RecordError(f"preference field {name!r} is {got}; expected text or a list of chat turns")


def tokenize_pair(record: Any, spec: RecordSpec, tokenizer: Any, max_seq_len: int) -> Pair:
    """A preference record tokenized and truncated (module docstring); RecordError names what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    f = spec.fields
    prompt = _turns_or_text(record, f.prompt, spec, optional=True)
    chosen, rejected = _turns_or_text(record, f.chosen, spec), _turns_or_text(record, f.rejected, spec)
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RecordError(f"preference field {f.prompt!r} is missing (without it, {f.chosen!r} and "
                              f"{f.rejected!r} must be whole conversations)")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise RecordError(f"{f.chosen!r} and {f.rejected!r} share no leading turns to be the prompt")
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        prompt_ids = _bos_eos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], eos=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in (chosen, rejected)]
        parts = [(prompt_ids, r, list(r)) for r in responses]
    else:
        def turns(x: Any, role: str) -> list[dict]:
            return [{"role": role, "content": x}] if isinstance(x, str) else x

        parts = [_chat_sample(tokenizer, turns(prompt, "user"), turns(r, "assistant"), name)
                 for r, name in ((chosen, f.chosen), (rejected, f.rejected))]
        if parts[0][0] != parts[1][0]:
            raise RecordError(f"{f.chosen!r} and {f.rejected!r} render different prompt tokens with this chat "
                              "template; give the prompt as its own field")
    return _truncated(parts, max_seq_len, tokenizer.bos_token_id)


def _truncated(parts: list[tuple[list, list, list]], limit: int, bos: Any) -> Pair:
    prompt = parts[0][0]
    longest = max(len(p[1]) for p in parts)
    truncated = len(prompt) + longest > limit
    if truncated:
        keep = max(limit - longest, min(len(prompt), limit // 2))
        if keep < len(prompt):
            head = prompt[:1] if prompt and prompt[0] == bos else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):] if keep > len(head) else prompt[:keep]
    samples = []
    for _, ids, labels in parts:
        room = limit - len(prompt)
        labels = [IGNORE_INDEX] * len(prompt) + labels[:room]
        samples.append(Tokenized(prompt + ids[:room], labels))
    for s in samples:  # position 0 is never predicted (as _finish marks it)
        s.labels[0] = IGNORE_INDEX
    return Pair(samples[0], samples[1], truncated)


def collate_pairs(pairs: list[Pair], pad_id: int, sample_ids: list[str]) -> Batch:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded: one forward for both responses."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, sample_ids)
    batch.pairs = len(pairs)
    return batch


def pair_rows(batch_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen row indexes, rejected row indexes) of a collate_pairs batch with `batch_rows` rows."""
    half = batch_rows // 2
    return torch.arange(half), torch.arange(half, 2 * half)
