"""The training run's own error type (its message is the one line the CLI prints), raised from the losses up to
the recipe."""

from __future__ import annotations


class TrainError(RuntimeError):
    """A failure of the run with its reason (wrong world size, non-finite loss, bad checkpoint...)."""
