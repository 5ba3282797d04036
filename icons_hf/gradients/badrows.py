"""Rows that cannot give a gradient feature: every check, and what happens to such a row, in one place.

A row is bad when it is too long for the model, cannot be read (e.g. a missing image in a transform), has no
supervised token, has a non-finite loss, or gives a feature that is not finite or exactly zero (no direction).
With ``on_bad_row="error"`` the first bad row (lowest index) of a check raises :class:`BadRowError` naming it;
with ``"skip"`` it is left out of the store and recorded with its reason. Skips are logged by the main process
only; every process records its own in the store, so ``store.json`` lists them all.
"""

from __future__ import annotations

import logging

import numpy as np

from ..distributed import is_main_process

logger = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")


class BadRowError(ValueError):
    """A pool row that cannot give a gradient feature (named by its index)."""


def _message(row: int, reason: str) -> str:
    sep = " " if reason.startswith("cannot be read") else ": "
    return f"row {row}{sep}{reason}. Fix the row, or pass on_bad_row='skip' to record and skip it."


def length_problem(length: int, max_length: int | None, limit: int | None) -> str | None:
    """Why a row of ``length`` tokens cannot go through a model of position ``limit`` (after truncation to
    ``max_length``), or ``None``."""
    kept = length if max_length is None else min(length, max_length)
    if limit is None or kept <= limit:
        return None
    after = " after truncation" if kept < length else ""
    return f"{kept} tokens{after} exceed the model's limit of {limit}; pass max_length <= {limit} to truncate"


NO_SUPERVISED = "no supervised tokens (every label after the first is -100), so its gradient is zero"


def loss_problem(loss: float) -> str | None:
    return None if np.isfinite(loss) else f"non-finite loss ({loss})"


def feature_problems(features: np.ndarray) -> list[str | None]:
    """Per row of ``features`` (rows x dim): why it may not be stored as a feature, or ``None``."""
    finite = np.isfinite(features).all(axis=1)
    nonzero = (features != 0).any(axis=1)
    return [
        None if f and z else ("its gradient feature is not finite" if not f else "its gradient feature is exactly zero")
        for f, z in zip(finite, nonzero, strict=True)
    ]


class BadRows:
    """The bad rows of one batch: ``row -> reason``."""

    def __init__(self, on_bad_row: str):
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row={on_bad_row!r} is not supported; choose one of: {', '.join(ON_BAD_ROW)}.")
        self.on_bad_row = on_bad_row
        self.reasons: dict[int, str] = {}

    def __contains__(self, row) -> bool:
        return int(row) in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, row, reason: str | None) -> None:
        """Note ``row`` as bad (a ``None`` reason is no problem); the first reason found for a row stands."""
        if reason is not None and int(row) not in self.reasons:
            self.reasons[int(row)] = reason

    def check(self) -> None:
        """Raise for the lowest bad row when bad rows are errors."""
        if self.reasons and self.on_bad_row == "error":
            first = min(self.reasons)
            raise BadRowError(_message(first, self.reasons[first]))

    def error(self, row, reason: str, cause: Exception | None = None) -> None:
        """Raise at once for ``row`` when bad rows are errors; otherwise note it."""
        if self.on_bad_row == "error":
            raise BadRowError(_message(int(row), reason)) from cause
        self.add(row, reason)

    def record(self, notes: dict) -> list[int]:
        """Add the skips to a shard's ``notes``; return the bad rows in ascending order."""
        main = is_main_process()
        for row, reason in sorted(self.reasons.items()):
            notes["skipped"].append({"index": row, "reason": reason})
            logger.log(logging.WARNING if main else logging.DEBUG, "Skipping row %d: %s", row, reason)
        return sorted(self.reasons)


__all__ = [
    "NO_SUPERVISED",
    "ON_BAD_ROW",
    "BadRowError",
    "BadRows",
    "feature_problems",
    "length_problem",
    "loss_problem",
]
