"""RewardPool: the reward rules of a batch scored in worker processes (pebble's ProcessPool, spawned: a worker
starts clean, not as a copy of a training process with its threads), each call with a hard timeout.

A batch call that times out is retried sample by sample, each with the timeout: a sample that hangs alone gets no
reward (None: masked in the loss, counted as a timeout), the others keep theirs; the worker that hung is killed and
replaced. A call that raises is retried sample by sample to find the record it fails on, and stops the run with one
line naming the function and that record."""

from __future__ import annotations

import functools
import math
import multiprocessing
import numbers
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Optional

from pebble import ProcessPool

from ftcore.rewards import RewardError, RewardRule, RewardSample, check_rules, resolve


@functools.lru_cache(maxsize=None)
def _function(path: str) -> Any:
    return resolve(path)


def _preload(paths: list[str]) -> None:
    """At a worker's start: import every rule's module, so a call's timeout measures the call, not the import."""
    for path in paths:
        _function(path)


def _call(path: str, arguments: dict) -> Any:
    """In a worker: the rule's function on one batch."""
    return _function(path)(**arguments)


@dataclass
class RewardScores:
    """Each rule's reward per sample (None: none, the call timed out), the weighted total (None when a rule gave
    none: the sample is masked) and each rule's timed-out samples."""

    per_rule: dict[str, list[Optional[float]]]
    total: list[Optional[float]]
    timeouts: dict[str, int]


class RewardPool:
    """Scores batches of samples by `rules` in `workers` processes, `timeout_s` per call; close() ends them."""

    def __init__(self, rules: list[RewardRule], workers: int = 2, timeout_s: float = 10.0):
        check_rules(rules)
        self.rules, self.timeout_s = rules, timeout_s
        self._pool = ProcessPool(max_workers=workers, initializer=_preload, initargs=([r.path for r in rules],),
                                 context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (a hung one is killed)."""
        self._pool.stop()
        self._pool.join()

    def score(self, samples: list[RewardSample]) -> RewardScores:
        """Every rule on every sample (the rules' calls run concurrently), and the weighted totals."""
        futures = {rule.label: self._pool.schedule(_call, (rule.path, _arguments(rule, samples)),
                                                   timeout=self.timeout_s) for rule in self.rules}
        per_rule, timeouts = {}, {}
        for rule in self.rules:
            values, timed_out = self._collect(rule, samples, futures[rule.label])
            per_rule[rule.label], timeouts[rule.label] = values, timed_out
        total: list[Optional[float]] = []
        for i in range(len(samples)):
            parts = [(rule.weight, per_rule[rule.label][i]) for rule in self.rules]
            total.append(None if any(v is None for _, v in parts) else sum(w * v for w, v in parts))
        return RewardScores(per_rule, total, timeouts)

    def _collect(self, rule: RewardRule, samples: list[RewardSample], future: Any) -> tuple[list, int]:
        try:
            return _checked(rule, samples, future.result()), 0
        except FutureTimeout:
            pass
        except RewardError:
            raise
        except Exception as e:  # find the record it fails on
            self._blame(rule, samples, e)
        # Timed out as a batch: each sample alone (concurrently), so only the ones that hang lose their reward.
        alone = [self._pool.schedule(_call, (rule.path, _arguments(rule, [s])), timeout=self.timeout_s)
                 for s in samples]
        values: list[Optional[float]] = []
        timed_out = 0
        for sample, one in zip(samples, alone):
            try:
                values.extend(_checked(rule, [sample], one.result()))
            except FutureTimeout:
                values.append(None)
                timed_out += 1
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(_raised(rule, e, sample.where)) from None
        return values, timed_out

    def _blame(self, rule: RewardRule, samples: list[RewardSample], error: BaseException) -> None:
        """Raise the error of `rule` on the first sample that fails alone (or on the batch, if none does)."""
        for sample in samples:
            try:
                self._pool.schedule(_call, (rule.path, _arguments(rule, [sample])), timeout=self.timeout_s).result()
            except FutureTimeout:
                continue
            except Exception as e:
                raise RewardError(_raised(rule, e, sample.where)) from None
        raise RewardError(_raised(rule, error, f"the batch of {samples[0].where} .. {samples[-1].where}")) from None


def _arguments(rule: RewardRule, samples: list[RewardSample]) -> dict:
    return {"prompts": [s.prompt for s in samples], "completions": [s.completion for s in samples],
            "references": [s.reference for s in samples], "records": [dict(s.record) for s in samples],
            "completion_tokens": [s.completion_tokens for s in samples], **rule.args}


def _raised(rule: RewardRule, error: BaseException, where: str) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"reward {rule.label} ({rule.path}) raised {type(error).__name__}: {message} on the record at {where}"


def _checked(rule: RewardRule, samples: list[RewardSample], values: Any) -> list[Optional[float]]:
    """The returned values as floats, or RewardError naming the rule and the record."""
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {rule.label} ({rule.path}) returned {type(values).__name__}, not a list of "
                          f"numbers (for the completions of {samples[0].where} ..)")
    if len(values) != len(samples):
        raise RewardError(f"reward {rule.label} ({rule.path}) returned {len(values)} values for {len(samples)} "
                          f"completions (the first of them: the record at {samples[0].where})")
    out: list[Optional[float]] = []
    for value, sample in zip(values, samples):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {rule.label} ({rule.path}) returned {value!r} for the record at "
                              f"{sample.where}: expected a finite number or None")
        out.append(float(value))
    return out
