"""Column arithmetic shared by the specialists and the consensus rules: exact within-column percentile ranks and
NumPy views of a score table's columns.

Within-column percentile ranks are ``(r - 1) / (N - 1)`` with ``r`` the average rank of equal values (1 = lowest);
``0.5`` for a one-row column. They are computed from exact integer keys (twice the 0-based average rank), so
rows with equal values get equal ranks whatever the sort leaves them in.
"""

from __future__ import annotations

import numpy as np

TASK_PREFIX = "influence_"


def task_columns(scores) -> list[str]:
    """The ``influence_<task>`` columns of a score table, in table order."""
    cols = [c for c in scores.column_names if c.startswith(TASK_PREFIX)]
    if not cols:
        raise ValueError("the score table has no influence_<task> columns; pass the output of compute_influence.")
    return cols


def column_arrays(scores, columns, dtype=None) -> dict[str, np.ndarray]:
    """Whole columns of a table as NumPy arrays (straight from Arrow: the ``numpy`` formatter of ``datasets``
    visits every value in Python, minutes for millions of rows)."""
    table = scores.with_format("arrow", columns=list(columns))[:]
    out = {}
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"column {name!r} of the score table has {column.null_count} missing values.")
        values = column.to_numpy()
        out[name] = values if dtype is None else values.astype(dtype, copy=False)
    return out


def score_matrix(scores, columns) -> np.ndarray:
    """``rows x tasks`` float64 matrix of the given columns; a non-finite score is an error naming row and column."""
    table = column_arrays(scores, columns, np.float64)
    mat = np.stack([table[c] for c in columns], axis=1) if len(scores) else np.zeros((0, len(columns)))
    if not np.all(np.isfinite(mat)):
        row, col = np.argwhere(~np.isfinite(mat))[0]
        raise ValueError(f"score table row {int(row)} has a non-finite {columns[col]}; recompute the influence.")
    return mat


def _sorted_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions that sort ``values`` ascending (ties in any order), and for each sorted position whether a run of
    equal values starts there."""
    n = len(values)
    if values.dtype == np.float32 and n < 1 << 32:
        # float32 (what compute_influence writes): sort 64-bit keys "orderable value bits | row" rather than an
        # argsort, several times faster. "+ 0" turns -0.0 into 0.0 so that equal values have equal bits; negative
        # values get their magnitude bits flipped so that the keys compare as the values do.
        bits = (values + np.float32(0)).view(np.int32)
        ordered = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).view(np.uint32) ^ np.uint32(0x80000000)
        keys = ordered.astype(np.uint64)
        keys <<= np.uint64(32)
        keys |= np.arange(n, dtype=np.uint64)
        keys.sort()
        order = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
        sorted_vals = keys >> np.uint64(32)
    else:
        order = np.argsort(values)
        sorted_vals = values[order]
    run_start = np.empty(n, dtype=bool)
    run_start[:1] = True
    np.not_equal(sorted_vals[1:], sorted_vals[:-1], out=run_start[1:])
    return order, run_start


def doubled_ranks(values: np.ndarray) -> np.ndarray:
    """Twice the 0-based average rank of each value (an exact integer: ties at positions s..e-1 share s + e - 1)."""
    n = len(values)
    if values.dtype == np.float64:
        narrow = values.astype(np.float32)
        if np.array_equal(narrow, values):  # float32 scores held as float64: same order, faster sort
            values = narrow
    # Equal values get the same average rank whatever order the sort leaves them in, so any sort will do.
    order, run_start = _sorted_runs(values)
    starts = np.flatnonzero(run_start)
    ends = np.append(starts[1:], n)
    doubled = np.empty(n, dtype=np.int64)
    doubled[order] = (starts + ends - 1)[np.cumsum(run_start) - 1]
    return doubled


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Within-column percentile rank in [0, 1] with ties sharing their average rank."""
    values = np.asarray(values)
    n = len(values)
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, 0.5)
    return doubled_ranks(values) / (2.0 * (n - 1))


def percentile_rank_matrix(mat: np.ndarray) -> np.ndarray:
    """Each column of a ``rows x tasks`` matrix as within-column percentile ranks (:func:`percentile_ranks`)."""
    if mat.shape[0] == 0:
        return np.zeros(mat.shape)
    return np.stack([percentile_ranks(mat[:, j]) for j in range(mat.shape[1])], axis=1)


def mean_rank(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean within-task percentile rank of each row, and an exact integer key that orders rows the same way
    (the sum of doubled ranks), so rows with equal mean ranks compare equal whatever the float rounding."""
    n, k = mat.shape
    if n == 1:
        return np.full(1, 0.5), np.zeros(1, dtype=np.int64)
    key = np.zeros(n, dtype=np.int64)
    for j in range(k):
        key += doubled_ranks(mat[:, j])
    return key / (2.0 * (n - 1) * k), key


__all__ = ["TASK_PREFIX", "column_arrays", "doubled_ranks", "mean_rank", "percentile_rank_matrix", "percentile_ranks",
           "score_matrix",
           "task_columns"]
