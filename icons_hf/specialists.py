"""Specialists: how one task's validation examples turn their cosines with a pool row into the task's score.

With checkpoints ``c`` of weight ``w_c``, a pool row ``z`` and a validation example ``v`` have the weighted
cosine ``c_v(z) = sum_c w_c cos(g_z^c, g_v^c)``. A specialist is one function registered with
:func:`specialist`, with its formula in its docstring, and one of two shapes:

* ``per_example=False`` (row-wise): the validation side is first reduced to one vector per (sub)task
  (``validation=`` names the reduction in :data:`VALIDATION_REDUCTIONS`); the function maps a batch's
  ``rows x subtasks`` weighted products to the task score. It runs inside the ``Dataset.map`` over the pool.
* ``per_example=True`` (column-wise): every validation example keeps its own unit vector; the map writes each
  example's cosine column, and the function combines the task's whole columns (one in memory at a time), since
  a within-pool rank or standardisation needs the whole column.

Adding one::

    @specialist("median_rank", per_example=True)
    def median_rank(columns, n_rows):
        \"\"\"I_k(z) = median_v q_v(z).\"\"\"
        ...

after which ``compute_influence(specialist="median_rank")`` and ``InfluenceSettings`` accept it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .ranks import percentile_ranks
from .rules import first_sentence


def mean_unit(features: np.ndarray, norms: np.ndarray, *, subtask: bool) -> np.ndarray:
    """``mean_v g_v / |g_v|``: the mean of the examples' unit vectors (one column)."""
    return (features / norms[:, None]).mean(axis=0)[:, None]


def mean_raw_for_subtasks(features: np.ndarray, norms: np.ndarray, *, subtask: bool) -> np.ndarray:
    """``mean_v g_v`` (raw, not normalised) for a subtask of a task given as subtasks, as the released ICONS
    scripts do for MME; ``mean_v g_v / |g_v|`` for a task given whole."""
    if not subtask:
        return mean_unit(features, norms, subtask=subtask)
    return features.mean(axis=0)[:, None]


def unit_examples(features: np.ndarray, norms: np.ndarray, *, subtask: bool) -> np.ndarray:
    """``g_v / |g_v|`` for every example (one column each)."""
    return (features / norms[:, None]).T


VALIDATION_REDUCTIONS: dict[str, Callable] = {
    "mean_unit": mean_unit,
    "mean_raw_for_subtasks": mean_raw_for_subtasks,
    "examples": unit_examples,
}


@dataclass(frozen=True)
class Specialist:
    """A registered specialist: its ``combine`` function, whether it works on per-example cosine columns, the
    validation reduction (``"examples"`` for per-example specialists), and how it describes itself: ``card_text``
    (the dataset card's sentence), ``score_kind`` (what its scores are, in a sentence of the report), ``axis_label``
    (the report's axis) and ``subtasks`` (how a task given as subtasks is combined)."""

    name: str
    combine: Callable
    per_example: bool
    validation: str
    card_text: str = ""
    score_kind: str = "influence scores"
    axis_label: str = "influence score"
    subtasks: str = "max over subtasks"

    def reduce_validation(self, features: np.ndarray, norms: np.ndarray, *, subtask: bool) -> np.ndarray:
        """``dim x columns`` float64 matrix the pool's unit features are multiplied by."""
        return VALIDATION_REDUCTIONS[self.validation](features, norms, subtask=subtask)


SPECIALISTS: dict[str, Specialist] = {}


def specialist(name: str, *, per_example: bool, validation: str | None = None, card_text: str | None = None,
               score_kind: str = "influence scores", axis_label: str = "influence score", subtasks: str | None = None):
    """Registers a specialist (see the module docstring for the two shapes). The descriptions default to the
    docstring's first sentence (``card_text``), plain influence scores, and subtasks' examples pooled
    (per-example) or the max over subtasks (row-wise)."""
    validation = "examples" if per_example else (validation or "mean_unit")
    if validation not in VALIDATION_REDUCTIONS:
        raise ValueError(f"validation={validation!r} is not one of: {', '.join(VALIDATION_REDUCTIONS)}.")
    if per_example and validation != "examples":
        raise ValueError("a per-example specialist sees every validation example: leave validation unset.")

    def register(function):
        if name in SPECIALISTS:
            raise ValueError(f"a specialist named {name!r} is already registered.")
        pooled = subtasks or ("examples pooled" if per_example else "max over subtasks")
        text = card_text or f"Influence of a pool row on a task: {first_sentence(function.__doc__)}."
        SPECIALISTS[name] = Specialist(name, function, per_example, validation, text, score_kind, axis_label, pooled)
        return function

    return register


@specialist(
    "balanced", per_example=True, score_kind="within-pool percentile ranks (0 to 1, the best example's)",
    axis_label="percentile rank (0-1)",
    card_text="Influence of a pool row on a task is the highest within-pool percentile rank it reaches for any one of "
    "the task's validation examples, by the cosine similarity of gradient features summed over checkpoints with the "
    "weights below; every validation example thus contributes about the same number of top rows.")
def balanced(columns: Iterable[np.ndarray], n_rows: int) -> np.ndarray:
    """``I_k(z) = max_v q_v(z)``, ``q_v`` the within-pool percentile rank of ``c_v``. A row scores high when it is
    among the best rows of *some* validation example, so a task's top rows are about the same number per example
    (the union of their top lists) whatever the example's answer class. Subtasks' examples are pooled."""
    acc = np.full(n_rows, -np.inf)
    for column in columns:
        np.maximum(acc, percentile_ranks(column), out=acc)
    return acc


@specialist(
    "zscore", per_example=True, score_kind="mean z-scores over the task's validation examples",
    axis_label="mean z-score",
    card_text="Influence of a pool row on a task is the mean over the task's validation examples of its z-scored "
    "cosine similarity with that example's gradient feature (standardised over the pool, summed over checkpoints with "
    "the weights below).")
def zscore(columns: Iterable[np.ndarray], n_rows: int) -> np.ndarray:
    """``I_k(z) = mean_v (c_v(z) - mean c_v) / std c_v``: every example's column standardised over the pool (a
    constant column is centred only), then averaged. Subtasks' examples are pooled."""
    acc, count = np.zeros(n_rows), 0
    for column in columns:
        column = column.astype(np.float64)
        std = column.std()
        acc += (column - column.mean()) / (std if std > 0 else 1.0)
        count += 1
    return acc / max(count, 1)


@specialist(
    "mean", per_example=False, validation="mean_unit", score_kind="mean cosine similarities", axis_label="mean cosine",
    card_text="Influence of a pool row on a task is the mean cosine similarity between its gradient feature and the "
    "task's validation gradient features (the ICONS paper's specialist), summed over checkpoints with the weights "
    "below.")
def mean(products: np.ndarray) -> np.ndarray:
    """The ICONS paper (following LESS): ``I_k(z) = max_s mean_{v in s} c_v(z)`` over the task's subtasks ``s``
    (one subtask for a task given whole). The mean cosine is the cosine with the examples' mean unit vector, so
    it is one product per row; the examples whose cosines spread widest over the pool decide the ranking."""
    return products.max(axis=1)


@specialist(
    "mean_released", per_example=False, validation="mean_raw_for_subtasks",
    score_kind="products with the mean validation gradient", axis_label="influence score",
    card_text="Influence of a pool row on a task is, as the released ICONS scripts compute it, the mean cosine "
    "similarity between its gradient feature and the task's validation gradient features, summed over checkpoints "
    "with the weights below; for a task given as subtasks, the product of the row's unit feature with each subtask's "
    "unnormalised mean validation gradient, so a subtask with larger gradients weighs more in the max.")
def mean_released(products: np.ndarray) -> np.ndarray:
    """The released ICONS scripts: as ``"mean"`` for a task given whole; for a task given as subtasks (MME),
    ``I_k(z) = max_s sum_c w_c (g_z^c / |g_z^c|) . mean_{v in s} g_v^c``, the validation gradients averaged
    without normalisation, so a subtask with larger gradients weighs more in the max."""
    return products.max(axis=1)


__all__ = ["SPECIALISTS", "VALIDATION_REDUCTIONS", "Specialist", "specialist"]
