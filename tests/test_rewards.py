"""Rewards are rules: the built-ins score what they say, the user's functions run in worker processes, a hang costs
only the samples that hang (masked, counted), and a function that raises or returns the wrong thing stops the run
with one line naming it and the record."""

from __future__ import annotations

import time

import pytest

from ftcore.rewards import RewardError, RewardRule, RewardSample, check_rules
from ftcore.rewards.builtin import char_share, exact_answer, length, numeric_answer, overlong, regex
from ftcore.rewards.pool import RewardPool


def samples(*completions: str, references=None) -> list[RewardSample]:
    references = references or ["yes"] * len(completions)
    return [RewardSample(prompt="q?", completion=c, reference=r, where=f"data/rl.jsonl:{i + 1}",
                         record={"difficulty": i}, completion_tokens=len(c.split()))
            for i, (c, r) in enumerate(zip(completions, references))]


def test_builtin_rules_score_what_they_say():
    assert exact_answer([" 42 ", "4 2", "#### 7\n"], ["42", "42", "7"]) == [1.0, 0.0, 0.0]
    assert exact_answer(["so #### 7\n", "no marker"], ["7", "7"], extract=r"#### (\S+)") == [1.0, 0.0]
    assert numeric_answer(["it is 3,000.0 apples", "about 12 then 13", "none", "x = -0.5"],
                          ["3000", "12", "1", -0.5]) == [1.0, 0.0, 0.0, 1.0]
    assert numeric_answer([r"\boxed{12} wait 5"], ["12"], extract=r"\\boxed\{(.+?)\}") == [1.0]
    with pytest.raises(ValueError, match="holds no number"):
        numeric_answer(["1"], ["unknown"])
    assert regex(["<think>a</think> 5", "5"], pattern=r"^<think>.*</think>") == [1.0, 0.0]
    assert regex(["ab", "abc"], pattern="ab", full=True) == [1.0, 0.0]
    assert char_share(["ab1 ", "", "xyz"], chars="abcxyz") == [0.5, 0.0, 1.0]
    assert length([3, 10, 20], min_tokens=5, max_tokens=15) == [0.0, 1.0, 0.0]
    # DAPO eq. 13 with L_max = 20, L_cache = 8: no penalty up to 12, linear to -1 at 20, -1 beyond.
    assert overlong([12, 16, 20, 21], max_tokens=20, cache_tokens=8) == [0.0, -0.5, -1.0, -1.0]


def test_rules_are_checked_before_anything_runs():
    check_rules([RewardRule("exact_answer"), RewardRule("tests.reward_fns:says_yes", 0.5)])
    with pytest.raises(RewardError, match="'exact': not a built-in \\(exact_answer, numeric_answer, regex, "
                                          "char_share, length, overlong\\)"):
        check_rules([RewardRule("exact")])
    with pytest.raises(RewardError, match="tests.nowhere:f: cannot import tests.nowhere"):
        check_rules([RewardRule("tests.nowhere:f")])
    with pytest.raises(RewardError, match="tests.reward_fns has no function missing"):
        check_rules([RewardRule("tests.reward_fns:missing")])
    with pytest.raises(RewardError, match="'regex' is listed twice"):
        check_rules([RewardRule("regex", args={"pattern": "a"}), RewardRule("regex", args={"pattern": "b"})])
    with pytest.raises(RewardError, match="argument 'completions' is what every reward function is given"):
        RewardPool([RewardRule("regex", args={"completions": "a"})])


def test_weighted_total_of_builtin_and_user_rules_in_workers():
    rules = [RewardRule("exact_answer", 2.0), RewardRule("tests.reward_fns:says_yes", 0.5),
             RewardRule("tests.reward_fns:uses_the_record", 1.0, name="difficulty")]
    with RewardPool(rules, workers=2, timeout_s=30) as pool:
        scores = pool.score(samples("yes", "no", "yes indeed"))
    assert scores.per_rule == {"exact_answer": [1.0, 0.0, 0.0], "says_yes": [1.0, 0.0, 1.0],
                               "difficulty": [0.0, 1.0, 2.0]}
    assert scores.total == [2.5, 1.0, 2.5] and scores.timeouts == {"exact_answer": 0, "says_yes": 0,
                                                                   "difficulty": 0}


def test_a_hang_costs_only_the_samples_that_hang():
    rules = [RewardRule("tests.reward_fns:hangs_on_hang"), RewardRule("exact_answer")]
    started = time.monotonic()
    with RewardPool(rules, workers=2, timeout_s=3) as pool:
        scores = pool.score(samples("yes", "HANG", "yes"))
        assert scores.per_rule["hangs_on_hang"] == [1.0, None, 1.0]
        assert scores.total == [2.0, None, 2.0] and scores.timeouts["hangs_on_hang"] == 1
        # The hung worker was replaced: the pool goes on scoring.
        assert pool.score(samples("yes")).total == [2.0]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("function, message", [
    ("raises_on_boom", r"reward raises_on_boom \(tests.reward_fns:raises_on_boom\) raised KeyError: 'no answer "
                       r"field' on the record at data/rl.jsonl:2"),
    ("one_short", r"reward one_short \(tests.reward_fns:one_short\) returned 2 values for 3 completions \(the "
                  r"first of them: the record at data/rl.jsonl:1\)"),
    ("a_string_for_the_second", r"reward a_string_for_the_second \(tests.reward_fns:a_string_for_the_second\) "
                                r"returned '1.0' for the record at data/rl.jsonl:2: expected a finite number or None"),
])
def test_a_function_that_fails_stops_with_one_line_naming_it_and_the_record(function, message):
    with RewardPool([RewardRule(f"tests.reward_fns:{function}")], workers=1, timeout_s=30) as pool:
        with pytest.raises(RewardError, match=message) as caught:
            pool.score(samples("yes", "BOOM", "no"))
    assert "\n" not in str(caught.value)
