"""The Task interface (ftcore/tasks/): nothing outside the tasks asks which task runs; a task is found by its name
or import path, validated without torch; and a task defined only in the tests (tests/toy_task.py) trains,
evaluates and resumes through the normal path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcore.config import ConfigError, load_config
from ftcore.tasks import BUILTIN
from tests.conftest import ROOT, assert_same_final_adapter, read_jsonl, run_ft, tiny_run_args
from tests.test_layering import first_party_modules

TASK_NAMES = set(BUILTIN)  # causal_lm, classification, preference, kto


def task_questions(source: str, filename: str) -> list[str]:
    """Where `source` asks which task runs: reads a config's `task` (cfg.task, run_config.task, self.cfg.task),
    reads a `.classification` / `.kto` flag, or compares anything with a task's name ("kto" == loss)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = ast.unparse(node.value)
            if node.attr == "task" and owner.split(".")[-1] in ("cfg", "config", "run_config"):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
            elif node.attr in ("classification", "kto"):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare):
            constants = [c.value for side in [node.left, *node.comparators] for c in ast.walk(side)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if TASK_NAMES & set(constants):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_tasks_asks_which_task_runs():
    """The recipe, data, evaluation, plan, export and config ask the run's task (ftcore/tasks/), never `if task
    == ...`: a new task is a new module there, not a branch in nine others."""
    asked = []
    for module, path in first_party_modules().items():
        if module == "ftcore.tasks" or module.startswith("ftcore.tasks."):
            continue
        asked += task_questions(path.read_text(), str(path.relative_to(ROOT)))
    assert not asked, "ask the run's task (ftcore/tasks/) instead:\n" + "\n".join(asked)


@pytest.mark.parametrize("code", ['if cfg.task == "classification":\n    pass',
                                  'rows = 2 if self.cfg.data.kto else 1',
                                  'kto = self.preference.loss == "kto"',
                                  'ok = spec.format in ("preference", "kto")'])
def test_the_check_sees_each_way_of_asking(code):
    assert task_questions(code, "x.py"), code


@pytest.mark.parametrize("sets, name", [
    ([], "CausalLM"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]"], "Classification"),
    (["task=preference", "data.train=[{path: x.jsonl, format: preference}]"], "Preference"),
    (["task=preference", "preference.loss=kto", "data.train=[{path: x.jsonl, format: kto}]"], "KTO"),
    (["task=rl", "data.train=[{path: x.jsonl, format: prompt_completion}]", "rl.rewards=[{function: regex, args: "
      "{pattern: a}}, {function: tests.reward_fns:says_yes}]"], "RL"),
])
def test_every_builtin_task_validates_its_config_without_torch(sets, name):
    """Config validation asks the run's task; the command line stays torch-free, so the task modules must too."""
    code = ("import sys\nfrom ftcore.config import load_config\nfrom ftcore.tasks import task_for\n"
            f"cfg = load_config(None, {sets!r})\nprint(type(task_for(cfg)).__name__)\n"
            "assert 'torch' not in sys.modules, 'validating the config imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == name


@pytest.mark.parametrize("task, message", [
    ("regression", "task: 'regression' is not a task; built in: causal_lm, classification, preference, rl, or name "
                   "your own as package.module:Class"),
    ("tests.no_such_module:Task", "task: 'tests.no_such_module:Task': cannot import it (ModuleNotFoundError"),
    ("tests.toy_task:sample_losses", "task: 'tests.toy_task:sample_losses' is not a subclass of "
                                     "ftcore.tasks.base.Task"),
])
def test_a_task_that_is_not_one_is_a_one_line_error_naming_it(task, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"task={task}"])
    assert message in str(error.value) and "\n" not in str(error.value).strip()


def test_a_task_from_outside_ft_checks_its_own_fields():
    assert type(load_config(None, ["task=tests.toy_task:SampleMeanLM"]).task) is str
    with pytest.raises(ConfigError, match="data.packing: does not apply to the per-sample task"):
        load_config(None, ["task=tests.toy_task:SampleMeanLM", "data.packing=true"])


def toy_args(out: Path, *extra: str) -> list[str]:
    return tiny_run_args(out, "--set", "task=tests.toy_task:SampleMeanLM", *extra)


@pytest.mark.multiproc
@pytest.mark.trains
def test_a_task_defined_only_in_the_tests_trains_evaluates_and_resumes(tmp_path):
    """tests/toy_task.py, named by its import path, through `ft launch` on 2 ranks: every step's loss is its
    per-sample mean (its own reported term counts the step's 8 samples), its eval metrics are its own, and a run
    stopped at step 4 and resumed equals the uninterrupted run bit for bit (losses, evals, final adapter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the ranks import the task by its path, as a user's package
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_ft("launch", *toy_args(whole), "--nproc", "2", env=env)
    run_ft("launch", *toy_args(resumed, "--set", "train.stop_at_step=4"), "--nproc", "2", env=env)
    second = run_ft("launch", *toy_args(resumed), "--nproc", "2", env=env)
    assert "resumed from" in second.stdout and "per-sample mean cross-entropy" in second.stdout
    rows = {name: read_jsonl(out / "metrics.jsonl") for name, out in (("whole", whole), ("resumed", resumed))}
    steps = [r for r in rows["whole"] if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["toy_samples"] == 8 for r in steps)  # 4 per micro batch x 2 ranks, each counted once
    evals = [r for r in rows["whole"] if "eval_loss" in r]
    assert [e["step"] for e in evals] == [4, 8] and all(e["eval_toy_samples"] > 0 for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("loss", "eval_loss"):
        assert ([r[key] for r in rows["resumed"] if key in r] == [r[key] for r in rows["whole"] if key in r]), key
    assert_same_final_adapter(whole, resumed)
