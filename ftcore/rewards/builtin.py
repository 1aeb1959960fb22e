"""The built-in reward rules. Each takes the batch by keyword (ftcore/rewards/__init__.py) and returns one number
per completion.

    exact_answer    1 when the answer equals the reference, whitespace trimmed and collapsed (case kept)
    numeric_answer  1 when the answer's last number equals the reference's number (within `tolerance`)
    regex           1 when the completion matches `pattern` (re.search; `full=True`: the whole completion)
    char_share      the share of the completion's characters that are in `chars` (e.g. only digits, only ASCII)
    length          1 when the completion has between min_tokens and max_tokens tokens
    overlong        DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_tokens - cache_tokens,
                    then falling linearly to -1 at max_tokens, -1 beyond

The answer is the whole completion, or with `extract` (a regex with one group, e.g. "#### (.+)" or
"\\\\boxed\\{(.+?)\\}") the last match's group; a completion without a match scores 0."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _answer(completion: str, extract: Optional[str]) -> Optional[str]:
    if extract is None:
        return completion
    matches = re.findall(extract, completion, flags=re.DOTALL)
    return matches[-1] if matches else None


def _spaces(text: str) -> str:
    return " ".join(str(text).split())


def exact_answer(completions: list[str], references: list[Any], extract: Optional[str] = None,
                 **_: Any) -> list[float]:
    """1.0 when the (extracted) answer equals the reference after whitespace is trimmed and collapsed."""
    scores = []
    for completion, reference in zip(completions, references):
        answer = _answer(completion, extract)
        scores.append(float(answer is not None and _spaces(answer) == _spaces(reference)))
    return scores


def _last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_answer(completions: list[str], references: list[Any], extract: Optional[str] = None,
                   tolerance: float = 1e-6, **_: Any) -> list[float]:
    """1.0 when the last number of the (extracted) answer equals the reference's number, relatively within
    `tolerance`. A reference that holds no number is an error (the data is wrong, not the model)."""
    scores = []
    for completion, reference in zip(completions, references):
        want = reference if isinstance(reference, (int, float)) else _last_number(str(reference))
        if want is None:
            raise ValueError(f"the reference {reference!r} holds no number")
        answer = _answer(completion, extract)
        got = _last_number(answer) if answer is not None else None
        scores.append(float(got is not None and math.isclose(got, float(want), rel_tol=tolerance,
                                                             abs_tol=tolerance)))
    return scores


def regex(completions: list[str], pattern: str, full: bool = False, **_: Any) -> list[float]:
    """1.0 when the completion matches `pattern` (anywhere; `full`: the whole completion)."""
    compiled = re.compile(pattern, flags=re.DOTALL)
    match = compiled.fullmatch if full else compiled.search
    return [float(match(completion) is not None) for completion in completions]


def char_share(completions: list[str], chars: str, **_: Any) -> list[float]:
    """The share of each completion's characters that are in `chars` (0 for an empty completion)."""
    allowed = set(chars)
    return [sum(ch in allowed for ch in c) / len(c) if c else 0.0 for c in completions]


def length(completion_tokens: list[int], min_tokens: int = 0, max_tokens: Optional[int] = None,
           **_: Any) -> list[float]:
    """1.0 when the completion's token count is within [min_tokens, max_tokens]."""
    return [float(n >= min_tokens and (max_tokens is None or n <= max_tokens)) for n in completion_tokens]


def overlong(completion_tokens: list[int], max_tokens: int, cache_tokens: int, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment: 0 for |y| <= max_tokens - cache_tokens, ((max_tokens - cache_tokens) -
    |y|) / cache_tokens up to max_tokens, -1 beyond."""
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"overlong needs 0 < cache_tokens <= max_tokens, got {cache_tokens} and {max_tokens}")
    expected = max_tokens - cache_tokens
    return [0.0 if n <= expected else ((expected - n) / cache_tokens if n <= max_tokens else -1.0)
            for n in completion_tokens]


BUILTINS = ("exact_answer", "numeric_answer", "regex", "char_share", "length", "overlong")
