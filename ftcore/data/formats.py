"""Record -> tokens + labels, per format. Knows nothing of models except the tokenizer.

- chat:   {"messages": [{"role": "system|user|assistant|tool", "content": str}, ...]}
- alpaca: {"instruction": str, "input": str (optional), "output": str} -> a user/assistant exchange
- text:   {"text": str} -> BOS + text + EOS
- prompt_completion: {"prompt": str, "completion": str} -> BOS + prompt + completion + EOS (raw text, no template)
- classification: {"text": str, "label": name or id} -> the text tokenized as `tokenizer(text)` does at inference
  (the model's special tokens), and one class id; the model classifies from the last token.

Field names come from the source's `fields`, role names may be renamed with its `roles`.

labels are the input ids where the token carries loss and -100 elsewhere (HF models shift them internally);
for classification, labels is [class id].
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Optional

from ftcore.data.chat_template import ROLES, assistant_char_spans, render

IGNORE_INDEX = -100
DEFAULT_TRAIN_ON = {"chat": "assistant", "alpaca": "completion", "prompt_completion": "completion", "text": "all",
                    "classification": "all", "preference": "completion", "kto": "completion"}
VALID_TRAIN_ON = {
    "chat": {"assistant", "last_assistant", "all"},
    "alpaca": {"completion", "all"},
    "prompt_completion": {"completion", "all"},
    "text": {"all"},
    "classification": {"all"},
    "preference": {"completion"},
    "kto": {"completion"},
}


class RecordError(ValueError):
    """A malformed record; the stream prefixes it with file:line."""


@dataclass
class Tokenized:
    """One tokenized sample: its token ids and labels (IGNORE_INDEX where the loss is masked)."""
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is computed on."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RecordSpec:
    """How to read one source's records: its format, field names, role renames and loss mask."""

    format: str
    train_on: str
    fields: Any = None  # ftcore.config.FieldNames
    roles: dict = dc_field(default_factory=dict)
    labels: Optional[list[str]] = None  # classification: class names in id order


def resolve_train_on(fmt: str, train_on: Optional[str]) -> str:
    """The data.train_on mode for a format (its default when unset); ValueError when it does not apply."""
    mode = train_on or DEFAULT_TRAIN_ON[fmt]
    if mode not in VALID_TRAIN_ON[fmt]:
        raise ValueError(f"data.train_on={mode!r} does not apply to format {fmt!r}; "
                         f"valid: {', '.join(sorted(VALID_TRAIN_ON[fmt]))}")
    return mode


def _field(record: dict, name: str, kind: str, optional: bool = False) -> Any:
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if name not in record else f"{type(value).__name__}, not a string"
        raise RecordError(f"{kind} field {name!r} is {got}")
    return value


def _messages(record: dict, spec: RecordSpec) -> list[dict]:
    f = spec.fields
    turns = parse_turns(record.get(f.messages), f.messages, spec, missing=f.messages not in record)
    if not any(m["role"] == "assistant" for m in turns):
        raise RecordError("chat record has no assistant turn to learn from")
    return turns


def parse_turns(messages: Any, name: str, spec: RecordSpec, missing: bool = False) -> list[dict]:
    """A record's list of chat turns (field `name`) as {"role", "content"} dicts, roles renamed by the source."""
    f = spec.fields
    if not isinstance(messages, list) or not messages:
        got = "missing" if missing else ("empty" if messages == [] else type(messages).__name__)
        raise RecordError(f"chat field {name!r} must be a non-empty list of turns (is {got})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"{name}[{i}] is {type(m).__name__}, not an object")
        role = spec.roles.get(m.get(f.role), m.get(f.role))
        if role not in ROLES:
            raise RecordError(f"{name}[{i}].{f.role} is {m.get(f.role)!r}; expected one of {'/'.join(ROLES)}"
                              " (rename roles with the source's roles: mapping)")
        content = m.get(f.content)
        turn = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            turn["tool_calls"] = m["tool_calls"]
            turn["content"] = content if content is not None else ""
        if not isinstance(turn["content"], str):
            raise RecordError(f"{name}[{i}].{f.content} is "
                              f"{'missing' if content is None else type(content).__name__}, not a string")
        out.append(turn)
    return out


def _alpaca_messages(record: dict, spec: RecordSpec) -> list[dict]:
    f = spec.fields
    instruction = _field(record, f.instruction, "alpaca")
    extra = _field(record, f.input, "alpaca", optional=True)
    output = _field(record, f.output, "alpaca")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _bos_eos(tokenizer: Any, ids: list[int], eos: bool = True) -> list[int]:
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _finish(ids: list[int], labels: list[int]) -> Tokenized:
    # The first token is never predicted (HF shifts labels left by one): marking it keeps trained-token counts
    # exact, and in a packed row it stops a sample's first token being "predicted" from the previous sample.
    if labels:
        labels[0] = IGNORE_INDEX
    return Tokenized(ids, labels)


_MISSING = object()


def class_id(value: Any, field: str, labels: list[str]) -> int:
    """A record's label (a name from data.labels, or an integer id) as a class id."""
    if value is _MISSING:
        raise RecordError(f"classification field {field!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RecordError(f"classification field {field!r} is {type(value).__name__}; expected a class name or "
                          "an integer id")
    if isinstance(value, int):
        if not 0 <= value < len(labels):
            raise RecordError(f"label id {value} is outside 0..{len(labels) - 1} (data.labels has {len(labels)} "
                              "classes)")
        return value
    if value not in labels:
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        raise RecordError(f"label {value!r} is not one of data.labels ({shown})")
    return labels.index(value)


def prompt_and_reference(record: Any, spec: RecordSpec, tokenizer: Any) -> tuple[list[int], str]:
    """What a model is asked and what it should answer, as training rendered them: chat -> every turn before the
    last assistant turn, rendered with the chat template and its generation prompt, and that turn's text; alpaca
    -> the instruction (and input) likewise, and the output; prompt_completion -> the prompt's tokens (with BOS)
    and the completion. RecordError names what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    fmt, f = spec.format, spec.fields
    if fmt == "prompt_completion":
        prompt = tokenizer(_field(record, f.prompt, fmt), add_special_tokens=False)["input_ids"]
        return _bos_eos(tokenizer, prompt, eos=False), _field(record, f.completion, fmt)
    if fmt not in ("chat", "alpaca"):
        raise RecordError(f"format {fmt} has no reference answer to generate (use chat, alpaca or "
                          "prompt_completion)")
    messages = _messages(record, spec) if fmt == "chat" else _alpaca_messages(record, spec)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise RecordError("the conversation starts with its assistant turn; there is no prompt to answer")
    text = render(tokenizer, messages[:last], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"], messages[last]["content"]


def tokenize_labelled_text(record: Any, spec: RecordSpec, tokenizer: Any) -> Tokenized:
    """A {text, label} record (format classification): the text tokenized as `tokenizer(text)` does at inference
    (exactly what a user's tokenizer gives the exported model), and [class id] as its labels."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    f = spec.fields
    ids = tokenizer(_field(record, f.text, "classification"))["input_ids"]
    return Tokenized(ids, [class_id(record.get(f.label, _MISSING), f.label, spec.labels or [])])


def tokenize_record(record: Any, spec: RecordSpec, tokenizer: Any) -> Tokenized:
    """One record of `spec`'s format tokenized with its loss mask; RecordError names what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    fmt, train_on, f = spec.format, spec.train_on, spec.fields
    if fmt == "text":
        ids = _bos_eos(tokenizer, tokenizer(_field(record, f.text, "text"), add_special_tokens=False)["input_ids"])
        return _finish(ids, list(ids))
    if fmt == "prompt_completion":
        prompt_ids = tokenizer(_field(record, f.prompt, "prompt_completion"), add_special_tokens=False)["input_ids"]
        completion = _field(record, f.completion, "prompt_completion")
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        prompt_ids = _bos_eos(tokenizer, prompt_ids, eos=False)
        completion_ids = completion_ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        ids = prompt_ids + completion_ids
        labels = list(ids) if train_on == "all" else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        return _finish(ids, labels)

    messages = _messages(record, spec) if fmt == "chat" else _alpaca_messages(record, spec)
    which = "assistant" if train_on == "completion" else train_on
    try:
        text, spans = assistant_char_spans(tokenizer, messages, "assistant" if which == "all" else which)
    except ValueError as e:
        raise RecordError(str(e)) from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if which == "all":
        return _finish(ids, list(ids))
    labels = []
    for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    return _finish(ids, labels)
