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

Coverage (``task_floor``, any method): before the method's ranking fills the subset, each of the ``K`` tasks
reserves ``floor(task_floor * n / K)`` rows, its own highest-scoring rows, taken in turns (task order, one row
each) so that a row wanted by several tasks is counted once and the next task takes its next best; the method's
ranking then fills the rest. The default is ``task_floor=1.0`` for ``vote`` (every task gets an equal share of
the subset, and the votes order only the fewer than ``K`` rows the floors leave) and ``0`` for the other
methods; ``select(method="vote", task_floor=0)`` is the
paper's rule. Why: with few tasks, votes starve a task whose valuable rows only it likes (rows liked by two tasks
outvote rows liked by one), and in the easy-VQA replica (README) rows above two tasks' thresholds were about as
clean as the pool while each task's own top rows were cleaner; of the floors measured there (0, 0.5, 1) the full
floor was best on both pools.

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
DEFAULT_VOTE_FLOOR = 1.0  # select(method="vote") reserves the whole subset as per-task floors by default


def task_columns(scores) -> list[str]:
    cols = [c for c in scores.column_names if c.startswith("influence_")]
    if not cols:
        raise ValueError("the score table has no influence_<task> columns; pass the output of compute_influence.")
    return cols


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


def _doubled_ranks(values: np.ndarray) -> np.ndarray:
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
    return _doubled_ranks(values) / (2.0 * (n - 1))


def _mean_rank(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean within-task percentile rank of each row, and an exact integer key that orders rows the same way
    (the sum of doubled ranks), so rows with equal mean ranks compare equal whatever the float rounding."""
    n, k = mat.shape
    if n == 1:
        return np.full(1, 0.5), np.zeros(1, dtype=np.int64)
    key = np.zeros(n, dtype=np.int64)
    for j in range(k):
        key += _doubled_ranks(mat[:, j])
    return key / (2.0 * (n - 1) * k), key


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
    task_floor: float | None = None,
):
    """Select ``floor(fraction * N)`` rows (or exactly ``num_rows``) from a score table.

    ``task_floor``: the share of the subset reserved as equal per-task floors of each task's own top rows
    (module docstring); ``None`` means 1.0 for ``vote`` and 0 for the other methods, and ``0`` with ``vote`` is the
    paper's rule.

    Returns the table with added columns: ``votes`` (``vote``), ``consensus`` (the primary ranking score of the
    method), ``tiebreak`` and the boolean ``selected``. Its ``info.description`` keeps the influence provenance
    and adds the selection parameters.
    """
    validate_choice("method", method, METHODS)
    n_total = len(scores)
    if n_total == 0:
        raise ValueError("the score table is empty.")
    columns = task_columns(scores)
    if method == "task" and (task is None or f"influence_{task}" not in columns):
        known = ", ".join(c[len("influence_"):] for c in columns)
        raise ValueError(f"method='task' needs task= one of: {known} (got {task!r}).")
    if num_rows is None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction={fraction!r} must be in (0, 1].")
        n_keep = math.floor(fraction * n_total)
        if n_keep == 0:
            raise ValueError(
                f"fraction={fraction} of {n_total} rows selects no row (floor({fraction} x {n_total}) = 0); raise "
                "fraction, or pass num_rows."
            )
    else:
        if not (isinstance(num_rows, int) and 0 <= num_rows <= n_total):
            raise ValueError(f"num_rows={num_rows!r} must be an integer between 0 and {n_total}.")
        n_keep = num_rows
    if not (0 <= threshold_percentile <= 100):
        raise ValueError(f"threshold_percentile={threshold_percentile!r} must be within [0, 100].")
    if task_floor is None:
        task_floor = DEFAULT_VOTE_FLOOR if method == "vote" else 0.0
    if not (isinstance(task_floor, (int, float)) and 0 <= task_floor <= 1):
        raise ValueError(f"task_floor={task_floor!r} must be a share of the subset within [0, 1].")
    mat = _score_matrix(scores, columns)
    index = column_arrays(scores, ["index"])["index"].astype(np.int64)
    mean_rank = rank_key = None
    if method in ("vote", "rank"):
        mean_rank, rank_key = _mean_rank(mat)
    zeros = np.zeros(n_total)
    extra = {}
    thresholds = None
    # primary, tiebreak: the reported scores; the sort uses the keys (exact integers where they exist).
    if method == "vote":
        thresholds = np.percentile(mat, threshold_percentile, axis=0)
        votes = (mat > thresholds[None, :]).sum(axis=1)
        primary, tiebreak = votes.astype(np.float64), mean_rank
        primary_key, tiebreak_key = votes, rank_key
        extra["votes"] = votes.astype(np.int32)
    elif method == "rank":
        primary, tiebreak = mean_rank, zeros
        primary_key, tiebreak_key = rank_key, zeros
    else:
        if method == "mean":
            primary = mat.mean(axis=1)
        elif method == "max":
            primary = mat.max(axis=1)
        elif method == "norm":
            std = mat.std(axis=0)
            std[std == 0] = 1.0
            primary = ((mat - mat.mean(axis=0)) / std).mean(axis=1)
        elif method == "task":
            primary = mat[:, columns.index(f"influence_{task}")]
        else:  # random
            primary = np.random.default_rng(seed).random(n_total)
        tiebreak = zeros
        primary_key, tiebreak_key = primary, zeros
    selected = np.zeros(n_total, dtype=bool)
    floor_rows = _reserve_task_floors(mat, index, n_keep, task_floor, selected) if task_floor > 0 else None
    if floor_rows == 0:
        logger.warning(
            "task_floor=%g reserves no row: %d rows are selected for %d tasks (floor(%g x %d / %d) = 0 per task), so "
            "the %r ranking alone decides; select more rows for per-task floors.",
            task_floor, n_keep, len(columns), task_floor, n_keep, len(columns), method,
        )
    rest = np.flatnonzero(~selected)
    selected[rest[_top(n_keep - int(selected.sum()), primary_key[rest], tiebreak_key[rest], index[rest])]] = True
    if 0 < n_keep < n_total and floor_rows is None:
        cut_value = primary_key[selected].min()
        if (primary_key[~selected] == cut_value).any():
            logger.info(
                "%d rows share the cut-off score %.6g; tie broken by %s.",
                int((primary_key == cut_value).sum()),
                float(primary[np.flatnonzero(primary_key == cut_value)[0]]),
                "mean percentile rank, then index" if method == "vote" else "index",
            )
    out = scores
    for name, values in (*extra.items(), ("consensus", primary.astype(np.float32)), ("tiebreak", tiebreak.astype(np.float32)), ("selected", selected)):
        if name in out.column_names:
            out = out.remove_columns(name)
        out = out.add_column(name, np.asarray(values))
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
        "task_floor": float(task_floor),
    }
    if floor_rows is not None:
        info["selection"]["floor_rows_per_task"] = floor_rows
    out.info.description = json.dumps(info)
    return out


def _reserve_task_floors(mat: np.ndarray, index: np.ndarray, n_keep: int, task_floor: float, selected: np.ndarray) -> int:
    """Marks every task's reserved rows in ``selected`` (in place): ``floor(task_floor * n_keep / K)`` per task,
    its best rows by its own score (then ascending index), tasks taking turns. Returns the rows per task."""
    n_tasks = mat.shape[1]
    per_task = math.floor(task_floor * n_keep / n_tasks)
    # A task's pointer passes its own picks and rows other tasks took first: at most n_keep rows of its order, so
    # only the head of each order is sorted.
    orders = [_order_head(mat[:, j], index, per_task * n_tasks) for j in range(n_tasks)]
    pointers = [0] * n_tasks
    for _ in range(per_task):
        for j in range(n_tasks):
            while selected[orders[j][pointers[j]]]:
                pointers[j] += 1
            selected[orders[j][pointers[j]]] = True
    return per_task


def _order_head(scores: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` positions of the order by ``scores`` descending, then ``index`` ascending."""
    n = len(scores)
    if k >= n:
        return np.lexsort((index, -scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = np.partition(scores, n - k)[n - k]  # the k-th largest score: the head is above it or tied with it
    head = np.flatnonzero(scores >= cut)
    return head[np.lexsort((index[head], -scores[head]))][:k]


def _top(n_keep: int, primary: np.ndarray, tiebreak: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions of the ``n_keep`` best rows: ``primary`` descending, then ``tiebreak`` descending, then ``index``
    ascending. Only the rows that tie at the cut-off value of ``primary`` are sorted."""
    n = len(primary)
    if n_keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if n_keep >= n:
        return np.arange(n)
    # The n_keep-th largest primary value: rows above it are in, rows below it are out.
    cut = np.partition(primary, n - n_keep)[n - n_keep]
    above = np.flatnonzero(primary > cut)
    tied = np.flatnonzero(primary == cut)
    need = n_keep - len(above)
    if need < len(tied):
        # lexsort sorts by the last key first: tiebreak descending, then index ascending.
        tied = tied[np.lexsort((index[tied], -tiebreak[tied]))[:need]]
    return np.concatenate([above, tied])


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
