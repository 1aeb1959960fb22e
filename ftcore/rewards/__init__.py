"""Rewards are rules: functions that score a completion (task rl's rewards). A rule is a built-in
(ftcore/rewards/builtin.py: exact_answer, numeric_answer, regex, char_share, length, overlong) or the user's own
Python function, named `package.module:function`, with a weight and keyword arguments.

A reward function takes a batch by keyword and returns one number per completion (None: no reward for it):

    def my_reward(prompts, completions, references, records, completion_tokens, **args) -> list[float | None]

prompts (text, or chat turns), completions (text), references (the record's reference answer), records (each
record's other fields), completion_tokens (each completion's length in tokens); a function takes what it needs and
`**_` for the rest. Rules run in worker processes (RewardPool) with a hard timeout: a hang costs the samples that
hang their reward (masked, counted), never the run; a function that raises, returns the wrong count or something
not a number stops the run with one line naming the function and the record (file:line).

Imports without torch: a worker process loads only this package and the user's module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

BUILTIN_MODULE = "ftcore.rewards.builtin"
# What every reward function is given by keyword: a rule's own argument may not take one of these names.
BATCH_ARGUMENTS = ("prompts", "completions", "references", "records", "completion_tokens")


class RewardError(ValueError):
    """A reward function that cannot be used, or that failed on a record: one line naming both."""


@dataclass(frozen=True)
class RewardRule:
    """One reward: `function` (a built-in's name or `package.module:function`), its weight in the total and the
    keyword arguments it is called with; `name` is what the metrics call it (default: the function's name)."""

    function: str
    weight: float = 1.0
    args: dict = field(default_factory=dict)
    name: Optional[str] = None

    @property
    def label(self) -> str:
        """The rule's name in metrics and errors."""
        return self.name or self.function.rpartition(":")[2]

    @property
    def path(self) -> str:
        """`module:function` of the function (a built-in's module for a bare name)."""
        return self.function if ":" in self.function else f"{BUILTIN_MODULE}:{self.function}"


@dataclass(frozen=True)
class RewardSample:
    """What a reward function sees of one completion, and where its record came from (file:line)."""

    prompt: Any
    completion: str
    reference: Any
    where: str
    record: dict = field(default_factory=dict)  # the record's other fields
    completion_tokens: int = 0


def rules_of(configs: list) -> list[RewardRule]:
    """The rules of a config's reward list (rl.rewards, evaluation.rewards: RewardConfig entries)."""
    return [RewardRule(c.function, c.weight, dict(c.args), c.name) for c in configs]


def resolve(path: str) -> Callable[..., Any]:
    """The function `module:function` names; RewardError (one line) when it cannot be imported or is not
    callable."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise RewardError(f"reward function {path!r}: expected package.module:function or a built-in name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward function {path}: cannot import {module_name} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"reward function {path}: {module_name} has no function {name}")
    return function


def check_rules(rules: list[RewardRule]) -> None:
    """Every rule names a function that exists (imported here, as a worker will), with distinct labels and no
    argument named as the batch's."""
    from ftcore.rewards import builtin

    seen: set[str] = set()
    for rule in rules:
        if ":" not in rule.function and rule.function not in builtin.BUILTINS:
            raise RewardError(f"reward function {rule.function!r}: not a built-in ({', '.join(builtin.BUILTINS)}) "
                              "nor package.module:function")
        resolve(rule.path)
        clash = sorted(set(rule.args) & set(BATCH_ARGUMENTS))
        if clash:
            raise RewardError(f"reward {rule.label}: argument {clash[0]!r} is what every reward function is given; "
                              "rename it")
        if rule.label in seen:
            raise RewardError(f"reward {rule.label!r} is listed twice: give one of them a name")
        seen.add(rule.label)
