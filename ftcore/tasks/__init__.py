"""Tasks: what a run trains. One module per task, each a subclass of ftcore.tasks.base.Task answering every
question the rest of ft has about it (how records tokenize and collate, rows per example, the loss normaliser,
the objective, the eval metrics, whether a reference model is needed, its terms in `ft plan`, how `ft data
inspect` shows a sample, which of its fields a config may set). Nothing outside this package asks which task
runs: it asks the run's task.

Adding a task is a module here and one line in BUILTIN. A task defined outside ft (a user's package, a test) is
named in the config by its import path, `package.module:Class`, and found the same way.

This package's __init__ is the registry and imports no task: tasks are found by import path when a config is
validated, and every task module imports without torch (config validation runs in the command line, which
stays torch-free; a task imports its engines in the methods that run them)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

# The config's task name (as task_name gives it) -> "module:Class".
BUILTIN = {
    "causal_lm": "ftcore.tasks.causal_lm:CausalLM",
    "classification": "ftcore.tasks.classification:Classification",
    "preference": "ftcore.tasks.preference:Preference",
    "kto": "ftcore.tasks.kto:KTO",
    "rl": "ftcore.tasks.rl:RL",
}


class UnknownTask(ValueError):
    """The config names a task that is neither built in nor importable; the message says which and why."""


def task_name(cfg: Any) -> str:
    """The registry key of `cfg`'s task: its `task`, except that task preference with preference.loss kto is the
    KTO task (its records, batches and objective are not pairs')."""
    if cfg.task == "preference" and cfg.preference.loss == "kto":
        return "kto"
    return cfg.task


def task_for(cfg: Any) -> Any:
    """The Task instance of `cfg` (a ftcore.tasks.base.Task)."""
    return load_task(task_name(cfg))


@lru_cache(maxsize=None)
def load_task(name: str) -> Any:
    """The task registered as `name`, or imported from `package.module:Class`; UnknownTask says why not."""
    target = BUILTIN.get(name)
    if target is None and ":" not in name:
        raise UnknownTask(f"{name!r} is not a task; built in: {', '.join(k for k in BUILTIN if k != 'kto')}, or "
                          "name your own as package.module:Class")
    module_name, _, class_name = (target or name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise UnknownTask(f"{name!r}: cannot import it ({type(e).__name__}: {e})") from None
    # Subclass of ftcore.tasks.base.Task, asked by name: the base imports the config, which imports this registry.
    if not (isinstance(cls, type) and any(f"{c.__module__}.{c.__qualname__}" == "ftcore.tasks.base.Task"
                                          for c in cls.__mro__)):
        raise UnknownTask(f"{name!r} is not a subclass of ftcore.tasks.base.Task")
    return cls()
