"""Preference data (task preference): a pair record {prompt, chosen, rejected} -> two tokenized samples that share
the prompt (format preference); a KTO record {prompt, completion, label} -> one sample marked desirable or not
(format kto); and the batches that hold them.

Each field may be plain text or a list of chat turns (the shapes of UltraFeedback- and TRL-style datasets):
- all plain text: BOS + prompt, then the response + EOS (raw text, as format prompt_completion);
- any of them turns: the conversation prompt + response rendered with the model's chat template; a text prompt
  is one user turn and a text response one assistant turn. Without a prompt field, chosen and rejected are whole
  conversations and their common leading turns are the prompt. A response must be one assistant turn.
Only the response tokens train (the prompt's labels are -100).

Truncation to data.max_seq_len (L), so that both responses stay comparable: when the prompt plus the longer
response exceeds L, the prompt loses tokens from its start (its first token kept when it is BOS) down to
L - longer response, but never below min(prompt, L // 2) tokens; then each response is cut at its end to fit
what is left. Both responses always follow the same prompt tokens. A KTO sample is truncated by the same rule
with its one completion.

A KTO batch (ftcore/tasks/kto.py) also holds, for its reference point (the KL term of arXiv 2402.01306),
mismatched rows: each sample's prompt followed by another sample's completion (token-level concatenation, truncated
by the same rule), which the loss scores without training on them. The other sample is the next one in stream
order (training: the record at the next stream position, whichever rank trains it; eval: the next sample of the
whole eval set), so the rows do not depend on how samples are dealt to ranks and micro batches."""

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

    @property
    def trainable(self) -> bool:
        """Both responses kept a token to train on (truncation may leave one without)."""
        return self.chosen.trained_tokens > 0 and self.rejected.trained_tokens > 0

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _prompt_and_response(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first], ids[first:], labels[first:]


def _chat_sample(tokenizer: Any, prompt: list[dict], response: list[dict], name: str) -> tuple[list, list, list]:
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise RecordError(f"field {name!r} must be one assistant turn (got "
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
        raise RecordError(f"field {name!r} renders to no response tokens")
    return _prompt_and_response(ids, labels)


def _turns_or_text(record: dict, name: str, spec: RecordSpec, optional: bool = False, kind: str = "preference"):
    value = record.get(name)
    if value is None and optional:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return parse_turns(value, name, spec)
    got = "missing" if name not in record else type(value).__name__
    raise RecordError(f"{kind} field {name!r} is {got}; expected text or a list of chat turns")


def tokenize_pair(record: Any, spec: RecordSpec, tokenizer: Any, max_seq_len: int) -> Pair:
    """A preference record tokenized and truncated (module docstring); RecordError names what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    f = spec.fields
    prompt = _turns_or_text(record, f.prompt, spec, optional=True)
    prompt, (chosen, rejected) = _split_conversation(
        prompt, [_turns_or_text(record, f.chosen, spec), _turns_or_text(record, f.rejected, spec)],
        [f.chosen, f.rejected], f.prompt, "preference")
    parts = _parts(tokenizer, prompt, [(chosen, f.chosen), (rejected, f.rejected)])
    samples, truncated, _ = _truncated(parts, max_seq_len, tokenizer.bos_token_id)
    return Pair(samples[0], samples[1], truncated)


def _truncated(parts: list[tuple[list, list, list]], limit: int,
               bos: Any) -> tuple[list[Tokenized], bool, list[int]]:
    """The samples (prompt + each response) cut to `limit` by the module's rule, whether anything was cut, and the
    prompt tokens they keep."""
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
    return samples, truncated, prompt


@dataclass
class KTOSample:
    """One KTO record, tokenized: its prompt's tokens and its completion's, whether the completion is desirable,
    and `sample`, the two joined and truncated (what trains)."""

    prompt: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool
    sample: Tokenized
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        """Completion tokens that train."""
        return self.sample.trained_tokens

    @property
    def trainable(self) -> bool:
        """The completion kept a token to train on."""
        return self.sample.trained_tokens > 0

    def __len__(self) -> int:
        return len(self.sample)

    def with_completion_of(self, other: "KTOSample", limit: int, bos: Any) -> Tokenized:
        """This prompt followed by `other`'s completion, truncated like a sample (a mismatched row)."""
        return _truncated([(self.prompt, other.completion_ids, other.completion_labels)], limit, bos)[0][0]


def _parts(tokenizer: Any, prompt: Any, responses: list[tuple[Any, str]]) -> list[tuple[list, list, list]]:
    """(prompt ids, response ids, response labels) per response: raw text (BOS + prompt, response + EOS) when all
    are text, else rendered with the chat template (a text prompt is one user turn, a text response one assistant
    turn); RecordError when the responses would not follow the same prompt tokens."""
    if isinstance(prompt, str) and all(isinstance(r, str) for r, _ in responses):
        prompt_ids = _bos_eos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], eos=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [(prompt_ids, ids, list(ids)) for ids in
                (tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r, _ in responses)]

    def turns(x: Any, role: str) -> list[dict]:
        return [{"role": role, "content": x}] if isinstance(x, str) else x

    parts = [_chat_sample(tokenizer, turns(prompt, "user"), turns(r, "assistant"), name) for r, name in responses]
    if any(p[0] != parts[0][0] for p in parts):
        raise RecordError(f"{' and '.join(repr(n) for _, n in responses)} render different prompt tokens with this "
                          "chat template; give the prompt as its own field")
    return parts


def _split_conversation(prompt: Any, responses: list[Any], names: list[str], prompt_name: str,
                        kind: str) -> tuple[Any, list]:
    """Without a prompt field, the responses are whole conversations: their common leading turns are the prompt
    (for one response: every turn before its last)."""
    if prompt is not None:
        return prompt, responses
    if not all(isinstance(r, list) for r in responses):
        raise RecordError(f"{kind} field {prompt_name!r} is missing (without it, "
                          f"{' and '.join(repr(n) for n in names)} must be whole conversation{'s' * (len(names) > 1)})")
    if len(responses) == 1:
        shared = len(responses[0]) - 1
    else:
        shared = 0
        while shared < min(len(r) for r in responses) - 1 and all(r[shared] == responses[0][shared]
                                                                    for r in responses):
            shared += 1
    if not shared:
        raise RecordError(f"{' and '.join(repr(n) for n in names)} "
                          f"{'share no leading turns' if len(names) > 1 else 'has no turn before its last'} "
                          "to be the prompt")
    return responses[0][:shared], [r[shared:] for r in responses]


def tokenize_kto(record: Any, spec: RecordSpec, tokenizer: Any, max_seq_len: int) -> KTOSample:
    """A KTO record {prompt, completion, label: true|false} tokenized and truncated (module docstring)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    f = spec.fields
    label = record.get(f.label)
    if not isinstance(label, bool):
        got = "missing" if f.label not in record else repr(label)
        raise RecordError(f"kto field {f.label!r} is {got}; expected true (desirable) or false (undesirable)")
    prompt = _turns_or_text(record, f.prompt, spec, optional=True, kind="kto")
    prompt, (completion,) = _split_conversation(prompt, [_turns_or_text(record, f.completion, spec, kind="kto")],
                                                [f.completion], f.prompt, "kto")
    ((prompt_ids, ids, labels),) = _parts(tokenizer, prompt, [(completion, f.completion)])
    (sample,), truncated, kept = _truncated([(prompt_ids, ids, labels)], max_seq_len, tokenizer.bos_token_id)
    return KTOSample(kept, ids, labels, label, sample, truncated)


def collate_pairs(pairs: list[Pair], pad_id: int, sample_ids: list[str]) -> Batch:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded: one forward for both responses."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, sample_ids)
    batch.examples, batch.blocks = len(pairs), 2
    return batch


def pair_rows(batch_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen row indexes, rejected row indexes) of a collate_pairs batch with `batch_rows` rows."""
    half = batch_rows // 2
    return torch.arange(half), torch.arange(half, 2 * half)
