"""The numbers of a selection report, computed from the score table and the export's provenance.

Task ``k``'s *top set* is the rows that give it a vote, counted with the consensus rules' own
:func:`icons_hf.rules.vote_hits` (``>`` the threshold, or ``>=`` when the selection was made with
``threshold_inclusive``); a selection made with another method is reported against the thresholds of the default
selection settings' percentile (the 80th). The overlap of task ``a`` with task ``b`` is ``|top_a & top_b| / |top_a|``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from .consensus import task_overlap, vote_histogram
from .ranks import TASK_PREFIX, column_arrays, percentile_ranks, score_matrix, task_columns
from .rules import column_thresholds, vote_hits
from .settings import SelectionSettings
from .specialists import SPECIALISTS

# A selection made without thresholds is reported against the default selection's (SelectionSettings).
DEFAULT_THRESHOLD_PERCENTILE = float(SelectionSettings().threshold_percentile)


def score_label(metadata: Mapping) -> str:
    """The axis label of a task's scores: the specialist's own (:class:`icons_hf.specialists.Specialist`)."""
    entry = SPECIALISTS.get(str(metadata.get("influence", {}).get("specialist", "mean")))
    return entry.axis_label if entry else "influence score"


def score_kind(metadata: Mapping) -> str:
    """What a task's scores are, in words: the specialist's own."""
    entry = SPECIALISTS.get(str(metadata.get("influence", {}).get("specialist", "mean")))
    return entry.score_kind if entry else "influence scores"


def vote_settings(selection: Mapping) -> tuple[float, bool, dict]:
    """``(threshold percentile, inclusive, stored thresholds)`` of a selection: its own for ``vote``; for another
    method the 80th percentile, strict, computed here."""
    settings = selection.get("settings") or {}
    inclusive = bool(selection.get("threshold_inclusive", settings.get("threshold_inclusive", False)))
    percentile = selection.get("threshold_percentile")
    if percentile is None:
        return DEFAULT_THRESHOLD_PERCENTILE, inclusive, {}
    return float(percentile), inclusive, dict(selection.get("thresholds") or {})


def _pairwise(top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-set sizes, ``|top_a & top_b| / |top_a|`` and the Jaccard index of every pair of tasks."""
    sizes = top.sum(axis=0)
    inter = top.T.astype(np.int64) @ top.astype(np.int64)
    share = np.divide(inter, sizes[:, None], out=np.zeros(inter.shape), where=sizes[:, None] > 0)
    union = sizes[:, None] + sizes[None, :] - inter
    jaccard = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    return sizes, share, jaccard


def _vote_counts(scores, top: np.ndarray) -> dict:
    """Rows per vote count (pool and selected), every count from 0 to the number of tasks; votes are recounted from
    ``top`` when the table has none (a method other than vote)."""
    if "votes" not in scores.column_names:
        scores = scores.add_column("votes", top.sum(axis=1).astype(np.int32).tolist())
    histogram = vote_histogram(scores)
    for v in range(top.shape[1] + 1):
        histogram.setdefault(v, {"pool": 0, "selected": 0})
    return dict(sorted(histogram.items()))


def _mean_ranks(mat: np.ndarray, selected: np.ndarray, tasks: list[str]) -> dict:
    """Per task, the mean within-pool percentile rank of the pool's rows and of the selected rows."""
    out = {}
    for j, task in enumerate(tasks):
        ranks = percentile_ranks(mat[:, j]) if len(mat) else np.zeros(0)
        out[task] = {"pool": float(ranks.mean()) if len(ranks) else 0.0,
                     "selected": float(ranks[selected].mean()) if selected.any() else 0.0}
    return out


def report_numbers(metadata: Mapping, scores) -> dict:
    sel = metadata["selection"]
    columns = task_columns(scores)
    tasks = [c[len(TASK_PREFIX) :] for c in columns]
    mat = score_matrix(scores, columns)
    arrays = column_arrays(scores, [*columns, "index", "selected"])
    index = arrays["index"].astype(np.int64)
    selected = arrays["selected"].astype(bool)
    n, n_sel = len(index), int(selected.sum())

    percentile, inclusive, stored = vote_settings(sel)
    own = [arrays[c] for c in columns]  # each column in its own dtype, as select compares them
    computed = column_thresholds(own, percentile) if n else [0.0] * len(tasks)
    thresholds = [stored[t] if t in stored else computed[j] for j, t in enumerate(tasks)]
    top = vote_hits(own, thresholds, inclusive) if n else np.zeros((0, len(tasks)), dtype=bool)

    histogram = _vote_counts(scores, top)
    sizes, share, jaccard = _pairwise(top)
    own_top = task_overlap(scores)
    above = {t: float(selected[top[:, j]].mean()) if sizes[j] else 0.0 for j, t in enumerate(tasks)}
    return {
        "tasks": tasks,
        "num_candidates": n,
        "num_selected": n_sel,
        "threshold_percentile": float(percentile),
        "thresholds_from": "selection" if stored else "computed",
        "thresholds": {t: float(x) for t, x in zip(tasks, thresholds, strict=True)},
        "threshold_inclusive": inclusive,
        "top_set_sizes": {t: int(s) for t, s in zip(tasks, sizes, strict=True)},
        "vote_histogram": {int(v): h for v, h in histogram.items()},
        "pairwise_overlap": {a: {b: float(share[i, j]) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
        "pairwise_jaccard": {a: {b: float(jaccard[i, j]) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
        "subset_overlap_top_k": own_top,
        "subset_overlap_above_threshold": above,
        "random_expectation": n_sel / n if n else 0.0,
        "score_label": score_label(metadata),
        "score_kind": score_kind(metadata),
        "floor_rows_per_task": int(sel.get("floor_rows_per_task") or 0) if float(sel.get("task_floor") or 0) > 0 else 0,
        "mean_percentile_rank": _mean_ranks(mat, selected, tasks),
        "_matrix": mat,
        "_selected": selected,
        "_index": index,
        "_share": share,
        "_top": top,
    }


def composition_rows(sub_labels: Sequence[str], pool_labels: Sequence[str] | None) -> list[dict]:
    sub = Counter(sub_labels)
    pool = Counter(pool_labels) if pool_labels is not None else None
    keys = sorted(set(sub) | set(pool or ()), key=lambda k: (-(pool or sub)[k], -sub[k], k))
    n_sub, n_pool = max(1, len(sub_labels)), max(1, len(pool_labels or ()))
    rows = []
    for key in keys:
        row = {"group": key, "selected": sub[key], "selected_share": sub[key] / n_sub}
        if pool is not None:
            row.update(
                pool=pool[key], pool_share=pool[key] / n_pool, selection_rate=sub[key] / pool[key] if pool[key] else 0.0
            )
        rows.append(row)
    return rows


__all__ = ["DEFAULT_THRESHOLD_PERCENTILE", "composition_rows", "report_numbers", "score_kind", "score_label",
           "vote_settings"]
