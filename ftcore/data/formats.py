"""Record -> tokens + labels, per format. Knows nothing of models except the tokenizer.

- chat:   {"messages": [{"role": "system|user|assistant|tool", "content": str}, ...]}
- alpaca: {"instruction": str, "input": str (optional), "output": str} -> a user/assistant exchange
- text:   {"text": str} -> BOS + text + EOS

labels are the input ids where the token carries loss and -100 elsewhere (HF models shift them internally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ftcore.data.chat_template import ROLES, assistant_char_spans

IGNORE_INDEX = -100
DEFAULT_TRAIN_ON = {"chat": "assistant", "alpaca": "completion", "text": "all"}
VALID_TRAIN_ON = {
    "chat": {"assistant", "last_assistant", "all"},
    "alpaca": {"completion", "all"},
    "text": {"all"},
}


class RecordError(ValueError):
    """A malformed record; the stream prefixes it with file:line."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def resolve_train_on(fmt: str, train_on: Optional[str]) -> str:
    mode = train_on or DEFAULT_TRAIN_ON[fmt]
    if mode not in VALID_TRAIN_ON[fmt]:
        raise ValueError(f"data.train_on={mode!r} does not apply to format {fmt!r}; "
                         f"valid: {', '.join(sorted(VALID_TRAIN_ON[fmt]))}")
    return mode


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("chat record needs a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("chat record has no assistant message to learn from")
    return messages


def _alpaca_messages(record: dict) -> list[dict]:
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise RecordError("alpaca record needs string fields 'instruction' and 'output'")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("alpaca field 'input' must be a string")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def tokenize_record(record: Any, fmt: str, train_on: str, tokenizer: Any) -> Tokenized:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        text = record.get("text")
        if not isinstance(text, str):
            raise RecordError("text record needs a string field 'text'")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))

    messages = _messages(record) if fmt == "chat" else _alpaca_messages(record)
    which = "assistant" if train_on == "completion" else train_on
    try:
        text, spans = assistant_char_spans(tokenizer, messages, "assistant" if which == "all" else which)
    except ValueError as e:
        raise RecordError(str(e)) from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if which == "all":
        return Tokenized(ids, list(ids))
    labels = []
    for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    return Tokenized(ids, labels)
