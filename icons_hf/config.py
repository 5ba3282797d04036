"""Shared argument validation."""

from __future__ import annotations

from collections.abc import Sequence


def validate_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of: {', '.join(map(str, choices))}.")


def validate_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0) -> None:
    if not (isinstance(value, (int, float)) and low < value <= high):
        raise ValueError(f"{name}={value!r} must be a number in ({low}, {high}].")
