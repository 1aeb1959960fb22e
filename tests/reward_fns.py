"""Reward functions of a user's own (`tests.reward_fns:NAME`), for tests/test_rewards.py: they run in the reward
workers, which import this module by name."""

import time


def says_yes(completions, **_):
    """1 for a completion that contains 'yes'."""
    return [float("yes" in c) for c in completions]


def hangs_on_hang(completions, **_):
    """Never returns for a completion containing HANG (a verifier stuck on one input); 1 otherwise."""
    if any("HANG" in c for c in completions):
        time.sleep(3600)
    return [1.0 for _ in completions]


def raises_on_boom(completions, **_):
    """Fails on a completion containing BOOM."""
    for c in completions:
        if "BOOM" in c:
            raise KeyError("no answer field")
    return [0.5 for _ in completions]


def one_short(completions, **_):
    """One value too few."""
    return [1.0 for _ in completions[1:]]


def a_string_for_the_second(completions, **_):
    """A string where a number belongs."""
    return [1.0 if i != 1 else "1.0" for i, _ in enumerate(completions)]


def uses_the_record(completions, records, **_):
    """The record's own field decides."""
    return [float(r["difficulty"]) for r in records]


def letter_share(completions, **_):
    """The share of a completion's characters that are ASCII lowercase letters: a dense signal even for a random
    model, which GRPO can raise within a few steps."""
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in c) / max(len(c), 1) for c in completions]


def letter_share_or_kill(completions, records, **_):
    """letter_share, except that a record naming a `kill_marker` file that exists removes it and kills the training
    process that called (kill -9, once): a machine lost at a moment the test chooses by data, not by timing."""
    import os
    import signal

    for record in records:
        marker = record.get("kill_marker")
        if marker and os.path.exists(marker):
            os.unlink(marker)
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)
    return letter_share(completions)


def letter_share_on_odd_answers(completions, references, **_):
    """letter_share where the reference answer is odd; 0.5 for every completion of an even one (a group with
    nothing to learn, which DAPO's dynamic sampling replaces)."""
    shares = letter_share(completions)
    return [s if int(str(r).strip()) % 2 else 0.5 for s, r in zip(shares, references)]
