"""Generalist selection: combine per-task influence columns into one subset.

:func:`select` takes its defaults from :class:`icons_hf.settings.SelectionSettings` (presets ``"default"`` and
``"paper"``); the rule (``method``) is one of the registered consensus rules of :mod:`icons_hf.rules`:

* ``vote`` (ICONS, default): per task a threshold ``tau_k`` at a percentile of its scores (NumPy's
  linear-interpolation percentile); ``votes(z) = sum_k 1[I_k(z) > tau_k]`` (``>=`` with ``threshold_inclusive``);
  rows ranked by votes.
* ``mean``, ``max``: the mean / maximum of the raw task scores.
* ``rank``: the mean over tasks of the row's within-task percentile rank.
* ``norm``: the mean over tasks of z-scored task scores (each task centred and scaled to unit std).
* ``task``: a single task's score (LESS-style specialist selection); name it with ``task=``.
* ``random``: a uniformly random subset drawn with ``seed``.

Size: ``int(fraction * N)`` rows (as Python computes it), or exactly ``num_rows``.

Coverage (``task_floor``, any method): before the method's ranking fills the subset, each of the ``K`` tasks
reserves ``floor(task_floor * n / K)`` rows, its own highest-scoring rows, taken in turns (task order, one row
each) so that a row wanted by several tasks is counted once and the next task takes its next best; the method's
ranking then fills the rest. A rule may size the floors unequally (``Ranking.floor_weights``; ``mix`` sizes them
by the pool's task mix): ``floor(task_floor * n)`` rows split in proportion to the weights. The default is
``task_floor=1.0`` for ``vote`` (every task gets an equal share of the subset, and the votes order only the fewer
than ``K`` rows the floors leave) and ``0`` for the other methods. Why: with few tasks, votes starve a task
whose valuable rows only it likes (rows liked by two tasks outvote rows liked by one), and in the easy-VQA replica
(README) rows above two tasks' thresholds were about as clean as the pool while each task's own top rows were
cleaner; of the floors measured there (0, 0.5, 1) the full floor was best on both pools.

The paper preset (``select(scores, fraction=f, preset="paper")``) is the released ICONS generalist: per task the
threshold is the ``100 - 100 f`` percentile of its scores, a task votes when its score is ``>=`` the threshold,
no floor, ``int(f * N)`` rows with the most votes. It gives the released code's vote counts, size and rows
strictly above / below the cut-off vote count; among rows at the cut-off, the library's tie-break below replaces
the released code's unstable sort. With ``num_rows`` the threshold percentile is ``100 - 100 num_rows / N``.

Ties are broken deterministically, never by sort order: for ``vote`` by the mean within-task percentile rank
(the ``rank`` score), then for every method by the ascending row ``index``. Within-task percentile ranks are
``(r - 1) / (N - 1)`` with ``r`` the average rank of equal scores (1 = lowest); ``0.5`` for a one-row pool.

The computed columns are attached with ``Dataset.map`` under a fingerprint derived from the table's fingerprint
and the settings, so an unchanged rerun on a table backed by files reuses the cached result file.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher

from .provenance import Provenance
from .ranks import TASK_PREFIX, column_arrays, score_matrix, task_columns
from .rules import RULES, Ranking, RuleInput
from .settings import SelectionSettings

logger = logging.getLogger(__name__)

def select(
    scores,
    fraction: float | None = None,
    threshold_percentile: float | None = None,
    method: str | None = None,
    *,
    task: str | None = None,
    seed: int | None = None,
    num_rows: int | None = None,
    task_floor: float | None = None,
    threshold_inclusive: bool | None = None,
    preset: str | None = None,
    settings: SelectionSettings | dict | None = None,
):
    """Select ``int(fraction * N)`` rows (or exactly ``num_rows``; giving both is refused) from a score table.

    Every argument left ``None`` takes its value from ``settings`` or the ``preset`` (``"default"`` or
    ``"paper"``, :class:`icons_hf.settings.SelectionSettings`); the default preset is ``fraction=0.2``,
    ``threshold_percentile=80``, ``method="vote"``, ``task_floor`` 1.0 for vote (0 for other methods).
    ``preset="paper"`` is the released ICONS rule (module docstring).

    Returns the table with added columns: ``votes`` (``vote``), ``consensus`` (the method's primary ranking score),
    ``tiebreak`` and the boolean ``selected``. Its provenance (:mod:`icons_hf.provenance`) keeps the influence part
    and adds the selection settings and results."""
    _one_size(fraction, num_rows)
    config = SelectionSettings.resolve(
        settings, preset, fraction=fraction, threshold_percentile=threshold_percentile, method=method, task=task,
        seed=seed, num_rows=num_rows, task_floor=task_floor, threshold_inclusive=threshold_inclusive)
    n_total = len(scores)
    if n_total == 0:
        raise ValueError("the score table is empty.")
    columns = task_columns(scores)
    if config.method == "task" and f"{TASK_PREFIX}{config.task}" not in columns:
        known = ", ".join(c[len(TASK_PREFIX):] for c in columns)
        raise ValueError(f"method='task' needs task= one of: {known} (got {config.task!r}).")
    n_keep = config.rows_to_keep(n_total)
    inputs = RuleInput(
        matrix=score_matrix(scores, columns), columns=list(column_arrays(scores, columns).values()),
        task_names=[c[len(TASK_PREFIX):] for c in columns],
        index=column_arrays(scores, ["index"])["index"].astype(np.int64),
        percentile=config.percentile(n_total), inclusive=config.threshold_inclusive, task=config.task, seed=config.seed)
    ranking = RULES[config.method](inputs)
    selected, floor_rows = _choose(inputs, ranking, n_keep, config)
    out = with_columns(scores, {**ranking.extra_columns, "consensus": ranking.primary.astype(np.float32),
                                "tiebreak": ranking.tiebreak.astype(np.float32), "selected": selected},
                       fingerprint=_selection_fingerprint(scores, config))
    info = _selection_info(config, ranking, inputs.task_names, n_keep, n_total, floor_rows)
    old = Provenance.of(scores)
    return Provenance(influence=old.influence, selection=info, extra=old.extra).attach(out)


def _selection_info(config: SelectionSettings, ranking: Ranking, task_names, n_keep: int, n_total: int,
                    floor_rows: list[int] | None) -> dict:
    """The selection part of the provenance: the settings, the sizes, the rule's own information and the floors."""
    info = {
        "settings": config.to_dict(), "method": config.method,
        "fraction": None if config.num_rows is not None else config.fraction,
        "num_rows": config.num_rows, "threshold_percentile": None, "thresholds": None,
        "task": config.task if config.method == "task" else None,
        "seed": config.seed if config.method == "random" else None,
        "num_selected": int(n_keep), "num_candidates": int(n_total), "tiebreak": ranking.tiebreak_text,
        "task_floor": config.floor_share(), **ranking.info,
    }
    if floor_rows is not None:
        info["floor_rows_per_task"] = min(floor_rows)  # the least any task's floor holds (all, in equal shares)
        if ranking.floor_weights is not None:
            info["floor_rows_by_task"] = dict(zip(task_names, floor_rows, strict=True))
    return info


def _choose(inputs: RuleInput, ranking: Ranking, n_keep: int, config: SelectionSettings):
    """The boolean selection: per-task floors first (when asked), then the ranking's best rows; and the floor rows
    per task (``None`` without floors)."""
    n_total, n_tasks = inputs.matrix.shape
    share = config.floor_share()
    selected = np.zeros(n_total, dtype=bool)
    floor_keys = inputs.matrix if ranking.floor_keys is None else ranking.floor_keys
    quotas = floor_quotas(n_keep, share, n_tasks, ranking.floor_weights) if share > 0 else None
    floor_rows = _reserve_task_floors(floor_keys, inputs.index, quotas, selected) if quotas is not None else None
    if quotas is not None and not sum(quotas):
        logger.warning(
            "task_floor=%g reserves no row: %d rows are selected for %d tasks (floor(%g x %d / %d) = 0 per task), so "
            "the %r ranking alone decides; select more rows for per-task floors.",
            share, n_keep, n_tasks, share, n_keep, n_tasks, config.method,
        )
    rest = np.flatnonzero(~selected)
    take = _top(n_keep - int(selected.sum()), ranking.primary_key[rest], ranking.tiebreak_key[rest], inputs.index[rest])
    selected[rest[take]] = True
    if 0 < n_keep < n_total and floor_rows is None:
        cut_value = ranking.primary_key[selected].min()
        if (ranking.primary_key[~selected] == cut_value).any():
            logger.info("%d rows share the cut-off score %.6g; tie broken by %s.",
                        int((ranking.primary_key == cut_value).sum()),
                        float(ranking.primary[np.flatnonzero(ranking.primary_key == cut_value)[0]]),
                        ranking.tiebreak_text)
    return selected, floor_rows


def _selection_fingerprint(scores, config: SelectionSettings) -> str:
    """Deterministic across processes: the table's own fingerprint (``datasets`` updates it on every transform)
    and the settings."""
    return Hasher.hash(["icons_hf.select/1", getattr(scores, "_fingerprint", None), config.to_dict()])


def add_rows_columns(batch: pa.Table, positions, *, columns: dict) -> pa.Table:
    """``Dataset.map`` function of :func:`with_columns`: the Arrow batch with the given whole columns' values at
    its rows appended (a same-named column is replaced)."""
    where = np.asarray(positions, dtype=np.int64)
    for name, values in columns.items():
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, pa.array(values[where]))
    return batch


def with_columns(table, columns: dict[str, np.ndarray], *, fingerprint: str):
    """``table`` with ``columns`` (whole NumPy columns, one value per row; same-named columns replaced), added by
    ``Dataset.map(batched=True)`` under ``fingerprint``: a table backed by files gets a cache file that an
    unchanged rerun reuses without calling the map function."""
    for name, values in columns.items():
        if values.dtype not in (np.dtype(bool), np.dtype(np.int32), np.dtype(np.float32)):
            raise TypeError(f"column {name!r} has dtype {values.dtype}; use bool, int32 or float32.")
    # Arrow batches in and out: no value goes through Python objects.
    return table.with_format("arrow").map(
        add_rows_columns, batched=True, batch_size=1 << 16, writer_batch_size=1 << 16, with_indices=True,
        fn_kwargs={"columns": columns},
        new_fingerprint=fingerprint, desc="select",
    ).with_format(table.format["type"], **table.format["format_kwargs"])


def _one_size(fraction, num_rows) -> None:
    if fraction is not None and num_rows is not None:
        raise ValueError(
            f"select got both fraction={fraction} and num_rows={num_rows}, which size the subset two ways; pass one."
        )


def selected_rows(scores):
    """The selected rows of a table returned by :func:`select`, in table order (``Dataset.filter``)."""
    if "selected" not in scores.column_names:
        raise ValueError("the table has no 'selected' column; call icons_hf.select(scores) first.")
    return scores.filter(
        lambda flags: flags, input_columns="selected", batched=True, batch_size=1 << 16, desc="selected"
    )


def floor_quotas(n_keep: int, task_floor: float, n_tasks: int, weights=None) -> list[int]:
    """Rows each task's floor reserves: ``floor(task_floor * n_keep / K)`` each (equal shares), or, with
    ``weights`` (a rule's ``floor_weights``), ``floor(task_floor * n_keep)`` rows split in proportion to them by
    largest remainders (equal remainders: the first task first)."""
    if weights is None:
        return [math.floor(task_floor * n_keep / n_tasks)] * n_tasks
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != n_tasks or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(
            f"floor weights {weights.tolist()} must be {n_tasks} non-negative numbers with a positive sum.")
    total = math.floor(task_floor * n_keep)
    exact = total * weights / weights.sum()
    quotas = np.floor(exact).astype(np.int64)
    for j in np.lexsort((np.arange(n_tasks), -(exact - quotas)))[: total - int(quotas.sum())]:
        quotas[j] += 1
    return quotas.tolist()


def _reserve_task_floors(mat: np.ndarray, index: np.ndarray, quotas: list[int], selected: np.ndarray) -> list[int]:
    """Marks every task's reserved rows in ``selected`` (in place): ``quotas[k]`` rows for task ``k``, its best rows
    by its column of ``mat`` (its own score, or the rule's ``floor_keys``; then ascending index), tasks taking
    turns (one row each per turn while they have quota left). Returns the quotas."""
    n_tasks = mat.shape[1]
    # A task's pointer passes its own picks and rows other tasks took first: at most sum(quotas) rows of its order,
    # so only the head of each order is sorted.
    orders = [_order_head(mat[:, j], index, sum(quotas)) for j in range(n_tasks)]
    pointers = [0] * n_tasks
    for turn in range(max(quotas, default=0)):
        for j in range(n_tasks):
            if turn >= quotas[j]:
                continue
            while selected[orders[j][pointers[j]]]:
                pointers[j] += 1
            selected[orders[j][pointers[j]]] = True
    return list(quotas)


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
    mat = score_matrix(scores, columns)
    table = column_arrays(scores, ["index", "selected"])
    selected, index = table["selected"].astype(bool), table["index"]
    k = int(selected.sum()) if top_fraction is None else math.floor(top_fraction * len(selected))
    out = {}
    for j, col in enumerate(columns):
        top = np.lexsort((index, -mat[:, j]))[:k]
        out[col[len(TASK_PREFIX):]] = float(selected[top].mean()) if k else 0.0
    return out


__all__ = ["select", "selected_rows", "task_overlap", "vote_histogram", "with_columns"]
