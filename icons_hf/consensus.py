"""Generalist selection: combine per-task influence columns into one subset.

Methods (``select(method=...)``); ``n = floor(fraction * N)`` rows are kept in every case:

* ``vote`` (ICONS, default): per task a threshold ``tau_k`` at ``threshold_percentile`` of its scores (NumPy's
  linear-interpolation percentile); ``votes(z) = sum_k 1[I_k(z) > tau_k]``; rows ranked by votes.
* ``mean``: the mean of the raw task scores.
* ``max``: the maximum of the raw task scores.
* ``rank``: the mean over tasks of the row's within-task percentile rank.
* ``norm``: the mean over tasks of z-scored task scores (each task centred and scaled to unit std).
* ``task``: a single task's score (LESS-style specialist selection); name it with ``task=``.
* ``random``: a uniformly random subset drawn with ``seed``.

Ties are broken deterministically, never by sort order: for ``vote`` by the mean within-task percentile rank
(the ``rank`` score), then for every method by the ascending row ``index``. Within-task percentile ranks are
``(r - 1) / (N - 1)`` with ``r`` the average rank of equal scores (1 = lowest); ``0.5`` for a one-row pool.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from .config import validate_choice
from .influence import provenance

logger = logging.getLogger(__name__)

METHODS = ("vote", "mean", "max", "rank", "norm", "task", "random")


def task_columns(scores) -> list[str]:
    cols = [c for c in scores.column_names if c.startswith("influence_")]
    if not cols:
        raise ValueError("the score table has no influence_<task> columns; pass the output of compute_influence.")
    return cols


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Within-column percentile rank in [0, 1] with ties sharing their average rank."""
    n = len(values)
    if n == 1:
        return np.full(1, 0.5)
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    ranks = np.empty(n, dtype=np.float64)
    # Average rank over runs of equal values.
    boundaries = np.flatnonzero(np.diff(sorted_vals) != 0) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [n]))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks / (n - 1)


def column_arrays(scores, columns, dtype=None) -> dict[str, np.ndarray]:
    """Whole columns of a table as NumPy arrays."""
    table = scores.with_format("numpy", columns=list(columns), dtype=dtype)[:]
    return {c: np.asarray(table[c]) for c in columns}


def _score_matrix(scores, columns) -> np.ndarray:
    table = column_arrays(scores, columns, np.float64)
    mat = np.stack([table[c] for c in columns], axis=1) if len(scores) else np.zeros((0, len(columns)))
    if not np.all(np.isfinite(mat)):
        row, col = np.argwhere(~np.isfinite(mat))[0]
        raise ValueError(f"score table row {int(row)} has a non-finite {columns[col]}; recompute the influence.")
    return mat


def select(
    scores,
    fraction: float = 0.2,
    threshold_percentile: float = 80.0,
    method: str = "vote",
    *,
    task: str | None = None,
    seed: int = 0,
    num_rows: int | None = None,
):
    """Select ``floor(fraction * N)`` rows (or exactly ``num_rows``) from a score table.

    Returns the table with added columns: ``votes`` (``vote``), ``consensus`` (the primary ranking score of the
    method), ``tiebreak`` and the boolean ``selected``. Its ``info.description`` keeps the influence provenance
    and adds the selection parameters.
    """
    validate_choice("method", method, METHODS)
    n_total = len(scores)
    if n_total == 0:
        raise ValueError("the score table is empty.")
    if num_rows is None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction={fraction!r} must be in (0, 1].")
        n_keep = math.floor(fraction * n_total)
    else:
        if not (isinstance(num_rows, int) and 0 <= num_rows <= n_total):
            raise ValueError(f"num_rows={num_rows!r} must be an integer between 0 and {n_total}.")
        n_keep = num_rows
    if not (0 <= threshold_percentile <= 100):
        raise ValueError(f"threshold_percentile={threshold_percentile!r} must be within [0, 100].")
    columns = task_columns(scores)
    mat = _score_matrix(scores, columns)
    index = column_arrays(scores, ["index"])["index"].astype(np.int64)
    ranks = np.stack([percentile_ranks(mat[:, j]) for j in range(mat.shape[1])], axis=1)
    mean_rank = ranks.mean(axis=1)
    extra = {}
    thresholds = None
    if method == "vote":
        thresholds = np.percentile(mat, threshold_percentile, axis=0)
        votes = (mat > thresholds[None, :]).sum(axis=1)
        primary, tiebreak = votes.astype(np.float64), mean_rank
        extra["votes"] = votes.astype(np.int32)
    elif method == "mean":
        primary, tiebreak = mat.mean(axis=1), np.zeros(n_total)
    elif method == "max":
        primary, tiebreak = mat.max(axis=1), np.zeros(n_total)
    elif method == "rank":
        primary, tiebreak = mean_rank, np.zeros(n_total)
    elif method == "norm":
        std = mat.std(axis=0)
        std[std == 0] = 1.0
        primary, tiebreak = ((mat - mat.mean(axis=0)) / std).mean(axis=1), np.zeros(n_total)
    elif method == "task":
        if task is None or f"influence_{task}" not in columns:
            known = ", ".join(c[len("influence_"):] for c in columns)
            raise ValueError(f"method='task' needs task= one of: {known} (got {task!r}).")
        primary, tiebreak = mat[:, columns.index(f"influence_{task}")], np.zeros(n_total)
    else:  # random
        primary, tiebreak = np.random.default_rng(seed).random(n_total), np.zeros(n_total)
    # lexsort sorts by the last key first: primary desc, tiebreak desc, index asc.
    order = np.lexsort((index, -tiebreak, -primary))
    selected = np.zeros(n_total, dtype=bool)
    selected[order[:n_keep]] = True
    if n_keep and n_keep < n_total:
        cut, nxt = order[n_keep - 1], order[n_keep]
        if primary[cut] == primary[nxt]:
            logger.info(
                "%d rows share the cut-off score %.6g; tie broken by %s.",
                int((primary == primary[cut]).sum()),
                primary[cut],
                "mean percentile rank, then index" if method == "vote" else "index",
            )
    out = scores
    for name, values in (*extra.items(), ("consensus", primary.astype(np.float32)), ("tiebreak", tiebreak.astype(np.float32)), ("selected", selected)):
        if name in out.column_names:
            out = out.remove_columns(name)
        out = out.add_column(name, values.tolist())
    info = provenance(scores)
    info["selection"] = {
        "method": method,
        "fraction": None if num_rows is not None else fraction,
        "num_rows": num_rows,
        "threshold_percentile": threshold_percentile if method == "vote" else None,
        "thresholds": None if thresholds is None else {c[len('influence_'):]: float(t) for c, t in zip(columns, thresholds)},
        "task": task if method == "task" else None,
        "seed": seed if method == "random" else None,
        "num_selected": int(n_keep),
        "num_candidates": int(n_total),
        "tiebreak": "mean within-task percentile rank, then ascending index" if method == "vote" else "ascending index",
    }
    out.info.description = json.dumps(info)
    return out


def vote_histogram(scores) -> dict[int, dict[str, int]]:
    """Rows per vote count, overall and among the selected rows."""
    table = column_arrays(scores, ["votes", "selected"])
    votes, selected = table["votes"], table["selected"].astype(bool)
    return {
        int(v): {"pool": int((votes == v).sum()), "selected": int(((votes == v) & selected).sum())}
        for v in range(int(votes.max()) + 1 if len(votes) else 0)
    }


def task_overlap(scores, top_fraction: float | None = None) -> dict[str, float]:
    """Per task: the share of that task's own top rows (same size as the selection) that the selection holds."""
    columns = task_columns(scores)
    mat = _score_matrix(scores, columns)
    table = column_arrays(scores, ["index", "selected"])
    selected, index = table["selected"].astype(bool), table["index"]
    k = int(selected.sum()) if top_fraction is None else math.floor(top_fraction * len(selected))
    out = {}
    for j, col in enumerate(columns):
        top = np.lexsort((index, -mat[:, j]))[:k]
        out[col[len("influence_"):]] = float(selected[top].mean()) if k else 0.0
    return out
