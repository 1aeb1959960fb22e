"""How a generated answer is scored against its reference (`ft eval --metric`, evaluation.generate).

    exact_match  the answer equals the reference, after trimming and collapsing whitespace (case kept)
    accuracy     the answer equals the reference as a label: case, punctuation and whitespace ignored
                 ("Positive." == "positive")
    contains     the reference occurs in the answer, case and whitespace ignored (an answer may explain itself)
    rouge_l      ROUGE-L F1 (longest common subsequence of words), by Google's rouge-score, on lowercased Unicode
                 words, so non-English text scores too

Each is a number in [0, 1] per sample; the score of a set is the mean over its samples.
"""

from __future__ import annotations

import re
import string
from typing import Callable

METRICS = ("exact_match", "accuracy", "contains", "rouge_l")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _spaces(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1 when equal after whitespace is trimmed and collapsed."""
    return float(_spaces(prediction) == _spaces(reference))


def _label(text: str) -> str:
    return _spaces(text.lower().translate(_PUNCTUATION))


def accuracy(prediction: str, reference: str) -> float:
    """1 when equal as labels: case, ASCII punctuation and whitespace ignored."""
    return float(_label(prediction) == _label(reference))


def contains(prediction: str, reference: str) -> float:
    """1 when the reference occurs in the prediction, case and whitespace ignored."""
    return float(_spaces(reference.lower()) in _spaces(prediction.lower()))


class _Words:
    """rouge-score's tokenizer interface: lowercased Unicode words (its default keeps only [a-z0-9])."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


_rouge = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 by rouge-score."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    return _rouge.score(reference, prediction)["rougeL"].fmeasure


SCORERS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "accuracy": accuracy,
                                                   "contains": contains, "rouge_l": rouge_l}


def score(prediction: str, reference: str, metrics: list[str]) -> dict[str, float]:
    """Each of `metrics` for one sample."""
    return {name: SCORERS[name](prediction, reference) for name in metrics}


def mean_scores(rows: list[dict[str, float]], metrics: list[str]) -> dict[str, float]:
    """The mean of each metric over the samples (0 for an empty set)."""
    return {name: (sum(r[name] for r in rows) / len(rows) if rows else 0.0) for name in metrics}
