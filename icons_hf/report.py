"""Selection reports: PNG figures and a Markdown page that show what a selection chose and why.

:func:`write_report` reads a folder written by :func:`icons_hf.export_selection` and writes, by default into
``<export_dir>/report/``::

    report.md                   the page: settings, tables of every plotted number, the figures
    report.json                 the same numbers, machine-readable
    score_distributions.png     per task: influence scores of the pool and of the subset, threshold marked
    vote_histogram.png          rows per vote count, pool vs subset
    task_overlap_heatmap.png    pairwise overlap between the tasks' top sets (the ICONS paper's figure)
    subset_overlap.png          per task: share of the task's own top rows that the subset holds
    composition.png             pool vs subset by group (source, image folder, question type, ...)

Definitions (the same as :func:`icons_hf.select`): task ``k``'s *top set* is the rows whose influence exceeds
``tau_k``, the task's ``threshold_percentile``-th percentile (NumPy's linear interpolation); a row's *votes*
are the number of top sets holding it. The overlap of task ``a`` with task ``b`` is
``|top_a & top_b| / |top_a|``. A selection made with another method than ``vote`` is reported against the
thresholds of the 80th percentile.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from .consensus import task_overlap, vote_histogram
from .export import ExportFolder, markdown_table, read_export
from .pools import column_values, is_records_format, load_pool
from .ranks import column_arrays, percentile_ranks, task_columns

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD_PERCENTILE = 80.0
FIGURES = {
    "scores": "score_distributions.png",
    "votes": "vote_histogram.png",
    "heatmap": "task_overlap_heatmap.png",
    "subset_overlap": "subset_overlap.png",
    "composition": "composition.png",
}
_MAX_GROUPS = 15
_POOL_COLOR, _SUBSET_COLOR, _THRESHOLD_COLOR = "#9aa5b1", "#e8702a", "#b8281e"
_OTHER_COLOR, _FLOOR_COLOR = "#f5bf8f", "#6a3d9a"


# --------------------------------------------------------------------------------------------------- reading


def _read(export_dir: str) -> tuple[ExportFolder, object]:
    import pyarrow.parquet as pq
    from datasets import Dataset

    export = read_export(export_dir, need=("scores.parquet",))
    if "selection" not in export.metadata:
        raise ValueError(f"{export.path / 'selection.json'} has no 'selection' entry; rerun icons_hf.export_selection.")
    scores_path = export.file("scores.parquet")
    scores = Dataset(pq.read_table(scores_path))
    for col in ("index", "selected"):
        if col not in scores.column_names:
            raise ValueError(f"{scores_path} has no {col!r} column; rerun icons_hf.export_selection.")
    task_columns(scores)
    table = column_arrays(scores, ["index", "selected"])
    chosen = np.sort(table["index"][table["selected"].astype(bool)].astype(np.int64))
    if not np.array_equal(chosen, np.sort(np.asarray(export.indices, dtype=np.int64))):
        raise ValueError(
            f"{export.path / 'indices.json'} lists {len(export.indices)} rows but scores.parquet marks {len(chosen)} "
            "other or different rows as selected; the folder mixes two exports. Rerun icons_hf.export_selection."
        )
    return export, scores


def _groups_from_records(records: Sequence[Mapping], field: str | None, where: str) -> tuple[list[str], str] | None:
    """One group label per record and the grouping's name: ``field``'s value, or (``field=None``) the default."""
    if field is not None:
        out = []
        for i, record in enumerate(records):
            if field not in record:
                raise ValueError(
                    f"{where}: record {i} has no {field!r} field; pass group_column= a field every record has, or "
                    "groups= a mapping from pool row to group."
                )
            out.append(_label(record[field]))
        return out, field
    if records and all("source" in r for r in records):
        return [_label(r["source"]) for r in records], "source"
    # LLaVA-665K: the image's top folder names the source (coco, gqa, ocr_vqa, textvqa, vg); no image = text-only.
    images = [r.get("image") for r in records]
    if any(isinstance(im, str) and "/" in im for im in images):
        labels = [
            im.split("/")[0] if isinstance(im, str) and "/" in im else ("text-only" if not im else "(no folder)")
            for im in images
        ]
        return labels, "image folder"
    return None


def _label(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _lookup_groups(groups, rows) -> list[str]:
    out = []
    for row in rows:
        row = int(row)
        if isinstance(groups, Mapping):
            if row not in groups:
                raise ValueError(f"groups= has no entry for pool row {row}; give a group for every scored row.")
        elif not 0 <= row < len(groups):
            raise ValueError(
                f"groups= has {len(groups)} entries but the scores refer to pool row {row}; give one group per pool "
                "row, in pool order."
            )
        out.append(_label(groups[row]))
    return out


def _reachable_pool(export: ExportFolder):
    """The pool recorded in the export when it is still there with as many rows as were scored, else ``None``."""
    path = export.pool_path()
    if path is None:
        return None
    pool = load_pool(path)
    if len(pool) != export.metadata["pool"]["num_rows"]:
        logger.warning(
            "The pool %s now has %d rows, not the %d that were exported; composition shows the subset only.",
            path,
            len(pool),
            export.metadata["pool"]["num_rows"],
        )
        return None
    return pool


def _record_groups(export: ExportFolder, pool_index, group_column):
    records, subset_file = export.subset_records()
    found = _groups_from_records(records, group_column, str(subset_file))
    if found is None:
        logger.info(
            "The records have no source field or image folders; pass group_column= or groups= for a "
            "composition section."
        )
        return None
    sub_labels, name = found
    pool_labels = None
    pool = _reachable_pool(export)
    if pool is not None and pool.records is not None:
        pool_found = _groups_from_records(pool.records, group_column, pool.path)
        if pool_found is not None:
            pool_labels = [pool_found[0][int(i)] for i in pool_index]
    return sub_labels, pool_labels, name


def _column_groups(export: ExportFolder, pool_index, group_column):
    import pyarrow.parquet as pq

    sub_labels = []
    for path in export.subset_shards():
        names = pq.read_schema(path).names
        if group_column not in names:
            raise ValueError(
                f"{path} has no column {group_column!r} (columns: {', '.join(names)}); pass another group_column=."
            )
        sub_labels += [_label(v) for v in pq.read_table(path, columns=[group_column]).column(0).to_pylist()]
    pool_labels = None
    pool = _reachable_pool(export)
    if pool is not None and pool.dataset is not None:
        if group_column not in pool.dataset.column_names:
            raise ValueError(f"the pool {pool.path} has no column {group_column!r}; pass another group_column=.")
        values = column_values(pool.dataset, group_column)
        pool_labels = [_label(values[int(i)]) for i in pool_index]
    return sub_labels, pool_labels, group_column


def _resolve_groups(export: ExportFolder, positions, pool_index, group_column, groups):
    """Group labels of the subset rows and, when the pool is reachable, of every scored pool row.

    Returns ``(subset_labels, pool_labels or None, group_name)`` or ``None`` when no grouping applies.
    """
    if groups is not None:
        if group_column is not None:
            raise ValueError("pass either group_column= or groups=, not both.")
        return _lookup_groups(groups, positions), _lookup_groups(groups, pool_index), "group"
    if is_records_format(export.format):
        return _record_groups(export, pool_index, group_column)
    if group_column is None:
        logger.info("No group_column= given for a datasets pool; the report has no composition section.")
        return None
    return _column_groups(export, pool_index, group_column)


# --------------------------------------------------------------------------------------------------- numbers


def score_label(metadata: Mapping) -> str:
    """What a task's score column holds: percentile ranks in 0-1 (the balanced specialist) or influence scores."""
    specialist = str(metadata.get("influence", {}).get("specialist", "mean"))
    return "percentile rank (0-1)" if specialist.startswith("balanced") else "influence score"


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


def _compute(metadata: Mapping, scores) -> dict:
    sel = metadata["selection"]
    columns = task_columns(scores)
    tasks = [c[len("influence_") :] for c in columns]
    arrays = column_arrays(scores, [*columns, "index", "selected"])
    mat = np.stack([np.asarray(arrays[c], dtype=np.float64) for c in columns], axis=1)
    if not np.all(np.isfinite(mat)):
        row, col = np.argwhere(~np.isfinite(mat))[0]
        raise ValueError(f"scores.parquet row {int(row)} has a non-finite {columns[col]}; recompute the influence.")
    index = arrays["index"].astype(np.int64)
    selected = arrays["selected"].astype(bool)
    n, n_sel = len(index), int(selected.sum())

    percentile = sel.get("threshold_percentile")
    stored = sel.get("thresholds") or {}
    if percentile is None:
        percentile = DEFAULT_THRESHOLD_PERCENTILE
    computed = np.percentile(mat, percentile, axis=0) if n else np.zeros(len(tasks))
    thresholds = np.asarray([float(stored.get(t, computed[j])) for j, t in enumerate(tasks)])
    top = mat > thresholds[None, :]

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
        "top_set_sizes": {t: int(s) for t, s in zip(tasks, sizes, strict=True)},
        "vote_histogram": {int(v): h for v, h in histogram.items()},
        "pairwise_overlap": {a: {b: float(share[i, j]) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
        "pairwise_jaccard": {a: {b: float(jaccard[i, j]) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
        "subset_overlap_top_k": own_top,
        "subset_overlap_above_threshold": above,
        "random_expectation": n_sel / n if n else 0.0,
        "score_label": score_label(metadata),
        "floor_rows_per_task": int(sel.get("floor_rows_per_task") or 0) if float(sel.get("task_floor") or 0) > 0 else 0,
        "mean_percentile_rank": _mean_ranks(mat, selected, tasks),
        "_matrix": mat,
        "_selected": selected,
        "_index": index,
        "_share": share,
        "_top": top,
    }


def _composition(sub_labels: Sequence[str], pool_labels: Sequence[str] | None) -> list[dict]:
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


# --------------------------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_scores(data: dict, path: str) -> None:
    tasks, mat, selected, top = data["tasks"], data["_matrix"], data["_selected"], data["_top"]
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = _new_figure(4.4 * ncols, 3.3 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    pct = data["threshold_percentile"]
    for j, task in enumerate(tasks):
        ax = axes[j // ncols][j % ncols]
        values = mat[:, j]
        bins = np.histogram_bin_edges(values, bins=min(50, max(10, int(np.sqrt(len(values))))))
        ax.hist(values, bins=bins, color=_POOL_COLOR, label="pool")
        # The subset split by this task's own threshold: its top-set rows, and rows selected for the other tasks.
        ax.hist(
            [values[selected & top[:, j]], values[selected & ~top[:, j]]],
            bins=bins,
            stacked=True,
            color=[_SUBSET_COLOR, _OTHER_COLOR],
            label=["selected, above this task's threshold", "selected, below it (picked for other tasks)"],
        )
        tau = data["thresholds"][task]
        ax.axvline(
            tau, color=_THRESHOLD_COLOR, linestyle="--", linewidth=1.5, label=f"threshold ({pct:g}th percentile)"
        )
        ax.set_title(
            f"task {task}: threshold {tau:.3g}\n{int((selected & ~top[:, j]).sum()):,} of "
            f"{int(selected.sum()):,} selected rows below it",
            fontsize="medium",
        )
        ax.set_xlabel(data["score_label"])
        ax.set_ylabel("rows")
    for j in range(len(tasks), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize="small", frameon=False)
    fig.suptitle(f"Per-task score distributions ({data['score_label']}): pool and selected rows")
    fig.savefig(path)


def _plot_votes(data: dict, path: str) -> None:
    hist = data["vote_histogram"]
    votes = np.asarray(list(hist))
    pool = np.asarray([h["pool"] for h in hist.values()])
    chosen = np.asarray([h["selected"] for h in hist.values()])
    fig = _new_figure(max(5.0, 0.9 * len(votes) + 2.5), 3.8)
    ax = fig.subplots()
    width = 0.4
    bars_pool = ax.bar(votes - width / 2, pool, width, color=_POOL_COLOR, label="pool")
    bars_sel = ax.bar(votes + width / 2, chosen, width, color=_SUBSET_COLOR, label="selected")
    ax.bar_label(bars_pool, fontsize="x-small", padding=1)
    ax.bar_label(bars_sel, fontsize="x-small", padding=1)
    ax.set_xticks(votes)
    ax.set_xlabel(f"votes (tasks whose {data['threshold_percentile']:g}th-percentile threshold the row exceeds)")
    ax.set_ylabel("rows")
    ax.set_title("Vote histogram: pool vs selected")
    ax.margins(y=0.12)
    ax.legend(frameon=False)
    fig.savefig(path)


def _plot_heatmap(data: dict, path: str) -> None:
    tasks, share = data["tasks"], data["_share"]
    side = max(4.0, 0.75 * len(tasks) + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(share * 100, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels=tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            value = share[i, j] * 100
            ax.text(
                j,
                i,
                f"{value:.0f}%",
                ha="center",
                va="center",
                fontsize="small",
                color="black" if value > 60 else "white",
            )
    pct = data["threshold_percentile"]
    ax.set_xlabel(f"task b (top {100 - pct:g}%: rows above its {pct:g}th percentile)")
    ax.set_ylabel("task a")
    ax.set_title("Overlap of the tasks' top rows:\nshare of task a's top rows also in task b's")
    fig.colorbar(image, ax=ax, label="overlap (%)", shrink=0.85)
    fig.savefig(path)


def _plot_subset_overlap(data: dict, path: str) -> None:
    tasks = data["tasks"]
    x = np.arange(len(tasks))
    top_k = np.asarray([data["subset_overlap_top_k"][t] for t in tasks]) * 100
    above = np.asarray([data["subset_overlap_above_threshold"][t] for t in tasks]) * 100
    fig = _new_figure(max(5.0, 1.1 * len(tasks) + 2.5), 3.8)
    ax = fig.subplots()
    label_k = f"task's top {data['num_selected']:,} rows"
    label_above = f"task's rows above its {data['threshold_percentile']:g}th percentile"
    if np.allclose(top_k, above):
        # The usual case (fraction = 1 - percentile/100, no ties): both measures are the same set.
        b1 = ax.bar(x, top_k, 0.6, color="#3b75af", label=f"{label_k} (= {label_above})")
        ax.bar_label(b1, fmt="%.0f%%", fontsize="x-small", padding=1)
    else:
        width = 0.4
        b1 = ax.bar(x - width / 2, top_k, width, color="#3b75af", label=label_k)
        b2 = ax.bar(x + width / 2, above, width, color="#7fb3d5", label=label_above)
        ax.bar_label(b1, fmt="%.0f%%", fontsize="x-small", padding=1)
        ax.bar_label(b2, fmt="%.0f%%", fontsize="x-small", padding=1)
    ax.axhline(
        data["random_expectation"] * 100,
        color="black",
        linestyle=":",
        linewidth=1.2,
        label=f"random subset of the same size ({data['random_expectation']:.0%})",
    )
    floor = data["floor_rows_per_task"]
    if floor and data["num_selected"]:
        # Per-task floors reserve each task's own best rows: every bar is at least this high, and tasks whose other
        # top rows the votes do not favour stay at it (hence equal bars).
        share = floor / data["num_selected"] * 100
        ax.axhline(
            share,
            color=_FLOOR_COLOR,
            linestyle="--",
            linewidth=1.2,
            label=f"per-task floor: each task's own top {floor:,} rows are reserved ({share:.0f}%)",
        )
    ax.set_xticks(x, labels=tasks, rotation=30 if len(tasks) > 5 else 0, ha="right" if len(tasks) > 5 else "center")
    ax.set_xlabel("target task")
    ax.set_ylabel("share held by the subset (%)")
    ax.set_ylim(0, 105)
    ax.set_title("How much of each task's own top rows the subset holds")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False, ncols=1)
    fig.savefig(path)


def _plot_composition(rows: list[dict], group_name: str, path: str) -> None:
    shown = rows[:_MAX_GROUPS]
    if len(rows) > _MAX_GROUPS:
        rest = rows[_MAX_GROUPS:]
        other = {"group": f"other ({len(rest)} groups)", "selected_share": sum(r["selected_share"] for r in rest)}
        if "pool_share" in rows[0]:
            other["pool_share"] = sum(r["pool_share"] for r in rest)
        shown = [*shown, other]
    labels = [r["group"] for r in shown][::-1]
    y = np.arange(len(shown))
    has_pool = "pool_share" in shown[0]
    fig = _new_figure(6.5, max(2.8, 0.45 * len(shown) + 1.6))
    ax = fig.subplots()
    height = 0.4 if has_pool else 0.6
    sel = np.asarray([r["selected_share"] for r in shown][::-1]) * 100
    if has_pool:
        pool = np.asarray([r["pool_share"] for r in shown][::-1]) * 100
        bp = ax.barh(y + height / 2, pool, height, color=_POOL_COLOR, label="pool")
        ax.bar_label(bp, fmt="%.1f%%", fontsize="x-small", padding=2)
    bs = ax.barh(y - height / 2 if has_pool else y, sel, height, color=_SUBSET_COLOR, label="selected")
    ax.bar_label(bs, fmt="%.1f%%", fontsize="x-small", padding=2)
    ax.set_yticks(y, labels=labels)
    ax.set_xlabel("share of rows (%)")
    ax.set_ylabel(group_name)
    ax.margins(x=0.15)
    ax.set_title(f"Composition by {group_name}" + (": pool vs selected" if has_pool else " (selected rows)"))
    fig.legend(loc="outside lower center", frameon=False, fontsize="small", ncols=2)
    fig.savefig(path)


# --------------------------------------------------------------------------------------------------- page


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _floor_text(sel: Mapping) -> str:
    floor = float(sel.get("task_floor") or 0)
    if floor <= 0:
        return "none (the subset is ranked by the method alone" + (
            ", the ICONS paper's rule)" if sel["method"] == "vote" else ")"
        )
    rows = sel.get("floor_rows_per_task")
    return f"{floor:.0%} of the subset reserved in equal shares" + (
        f": each task's own top {rows:,} rows" if rows else ""
    )


def _md_settings(metadata: Mapping, data: dict) -> list[str]:
    sel, pool = metadata["selection"], metadata["pool"]
    tasks, n, n_sel, pct = data["tasks"], data["num_candidates"], data["num_selected"], data["threshold_percentile"]
    skipped = metadata.get("influence", {}).get("skipped", [])
    lines = [
        f"# Selection report: {pool['name']}",
        "",
        markdown_table(
            ["setting", "value"],
            [
                [
                    "pool",
                    f"`{pool['name']}` ({pool['format']}, {pool['num_rows']:,} rows; {n:,} scored"
                    + (f", {len(skipped)} skipped" if skipped else "")
                    + ")",
                ],
                ["selected rows", f"{n_sel:,} ({_pct(n_sel / n) if n else '-'} of the scored rows)"],
                ["method", f"`{sel['method']}`" + (f" (task `{sel['task']}`)" if sel.get("task") else "")],
                ["per-task floor", _floor_text(sel)],
                ["specialist", f"`{metadata.get('influence', {}).get('specialist', 'mean')}`"],
                ["target tasks", ", ".join(f"`{t}`" for t in tasks)],
                [
                    "threshold percentile",
                    f"{pct:g}"
                    + ("" if sel["method"] == "vote" else " (for this report; the method uses no threshold)"),
                ],
                ["row identity", str(metadata.get("row_identity") or "not recorded (export made before row identity)")],
                ["library", f"icons_hf {metadata.get('library', {}).get('version', '?')}"],
            ],
        ),
        "",
    ]
    return lines


def _scale_notes(data: dict) -> list[str]:
    """Why scores pile up near 1 (balanced specialist) and why a task's selected rows can score below its pool."""
    notes = []
    if data["score_label"].startswith("percentile"):
        notes.append(
            "Scores pile up near 1 by construction: a row's score is the highest percentile rank it reaches for any "
            "one of the task's validation examples, and the maximum of many ranks is close to 1 for most rows (with "
            "V examples about V / (V + 1) on average). What matters is the order near the top, not the value."
        )
    below = [t for t in data["tasks"]
             if data["mean_percentile_rank"][t]["selected"] < data["mean_percentile_rank"][t]["pool"]]
    if below:
        notes.append(
            f"The selected rows' mean rank is below the pool's for {', '.join(f'`{t}`' for t in below)}: the "
            "subset also holds the rows picked for the other tasks, and where tasks want different rows (a task "
            "with its own cluster, such as yes/no questions beside shape and colour) those rows rank low for this "
            "task. Each task's own share is in the overlap table below."
        )
    return [line for note in notes for line in (note, "")]


def _md_distributions(data: dict) -> list[str]:
    tasks, pct = data["tasks"], data["threshold_percentile"]
    return [
        "## Influence score distributions",
        "",
        f"Each task's score is its {data['score_label']}. Each task's threshold is the {pct:g}th percentile of its "
        "scores; rows above it form the task's *top set* and give the row that task's vote. In each task's panel "
        "the selected rows are split at that task's threshold: light orange marks selected rows below it, picked "
        "for the other tasks.",
        "",
        *_scale_notes(data),
        f"![Influence score distributions per task with thresholds]({FIGURES['scores']})",
        "",
        markdown_table(
            [
                "task",
                "threshold",
                "rows above threshold",
                "mean percentile rank (pool)",
                "mean percentile rank (selected)",
            ],
            [
                [
                    t,
                    f"{data['thresholds'][t]:.6g}",
                    data["top_set_sizes"][t],
                    f"{data['mean_percentile_rank'][t]['pool']:.3f}",
                    f"{data['mean_percentile_rank'][t]['selected']:.3f}",
                ]
                for t in tasks
            ],
        ),
        "",
        "## Votes",
        "",
        f"![Vote histogram, pool vs selected]({FIGURES['votes']})",
        "",
        markdown_table(
            ["votes", "pool rows", "selected rows"],
            [[v, h["pool"], h["selected"]] for v, h in data["vote_histogram"].items()],
        ),
        "",
    ]


def _md_pairwise(data: dict) -> list[str]:
    tasks = data["tasks"]
    lines = ["## Overlap between the tasks' top sets", ""]
    if len(tasks) > 1:
        lines += [
            "Row *a*, column *b*: the share of task *a*'s top set that is also in task *b*'s top set "
            "(|top_a & top_b| / |top_a|). Low overlap means the tasks want different rows, which is what consensus "
            "voting balances.",
            "",
            f"![Pairwise overlap of the tasks' top sets]({FIGURES['heatmap']})",
            "",
            markdown_table(
                ["task a \\ task b", *tasks],
                [[a, *(_pct(data["pairwise_overlap"][a][b]) for b in tasks)] for a in tasks],
            ),
            "",
            "Jaccard index |top_a & top_b| / |top_a | top_b|:",
            "",
            markdown_table(
                ["task", *tasks], [[a, *(f"{data['pairwise_jaccard'][a][b]:.3f}" for b in tasks)] for a in tasks]
            ),
        ]
    else:
        lines.append("Only one target task: there is no pair of top sets to compare.")
    return lines


def _md_subset_overlap(data: dict) -> list[str]:
    tasks, n_sel = data["tasks"], data["num_selected"]
    return [
        "",
        "## Overlap of the subset with each task's own top rows",
        "",
        f"*Top {n_sel:,}*: the share of the task's own {n_sel:,} highest-scoring rows (ties by row position) that the "
        f"subset holds. *Above threshold*: the share of the task's top set that the subset holds. A random subset of "
        f"the same size holds {_pct(data['random_expectation'])} of either on average."
        + (
            f" Per-task floors reserve each task's own top {data['floor_rows_per_task']:,} rows "
            f"({_pct(data['floor_rows_per_task'] / n_sel)} of its top {n_sel:,}), so no bar is lower than that; a task "
            "whose other top rows the votes do not favour stays at it, which is why bars can be equal."
            if data["floor_rows_per_task"] and n_sel
            else ""
        ),
        "",
        f"![Overlap of the subset with each task's top rows]({FIGURES['subset_overlap']})",
        "",
        markdown_table(
            ["task", f"top {n_sel:,}", "above threshold"],
            [
                [t, _pct(data["subset_overlap_top_k"][t]), _pct(data["subset_overlap_above_threshold"][t])]
                for t in tasks
            ],
        ),
        "",
    ]


def _md_composition(composition: list[dict] | None, group_name: str | None) -> list[str]:
    lines = ["## Composition", ""]
    if composition:
        has_pool = "pool" in composition[0]
        lines += [f"![Composition by {group_name}]({FIGURES['composition']})", ""]
        if has_pool:
            lines.append(
                markdown_table(
                    [group_name, "pool rows", "pool share", "selected rows", "selected share", "selection rate"],
                    [
                        [
                            r["group"],
                            r["pool"],
                            _pct(r["pool_share"]),
                            r["selected"],
                            _pct(r["selected_share"]),
                            _pct(r["selection_rate"]),
                        ]
                        for r in composition
                    ],
                )
            )
        else:
            lines += [
                "The pool is not reachable from this folder; the table covers the selected rows only.",
                "",
                markdown_table(
                    [group_name, "selected rows", "selected share"],
                    [[r["group"], r["selected"], _pct(r["selected_share"])] for r in composition],
                ),
            ]
    else:
        lines.append("No grouping of the rows was given or found (pass `group_column=` or `groups=`).")
    return lines


def _markdown(metadata: Mapping, data: dict, composition: list[dict] | None, group_name: str | None) -> str:
    lines = (
        _md_settings(metadata, data)
        + _md_distributions(data)
        + _md_pairwise(data)
        + _md_subset_overlap(data)
        + _md_composition(composition, group_name)
    )
    return "\n".join([*lines, ""])


def write_report(
    export_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    group_column: str | None = None,
    groups: Mapping[int, object] | Sequence | None = None,
    group_name: str | None = None,
) -> str:
    """Write PNG figures and a Markdown page describing a selection exported by :func:`icons_hf.export_selection`.

    Args:
        export_dir: the folder written by ``export_selection``.
        output_dir: where to write the report (default ``<export_dir>/report``; created; files replaced).
        group_column: how to group rows for the composition section: a record field of a LLaVA pool or a column of
            a ``datasets`` pool. Default for LLaVA pools: the records' ``source`` field when every record has one,
            else the image's top folder (``coco``, ``gqa``, ... ; ``text-only`` without image); none for
            ``datasets`` pools.
        groups: instead of ``group_column``, the group of every scored pool row: a mapping pool row -> group or a
            sequence indexed by pool row.
        group_name: the grouping's name in titles and tables (default: ``group_column``, ``source`` or ``group``).

    Returns:
        The path of ``report.md``.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("write_report needs matplotlib: pip install matplotlib (or icons_hf[demo]).") from None
    export_dir = os.fspath(export_dir)
    output_dir = os.fspath(output_dir) if output_dir is not None else os.path.join(export_dir, "report")
    export, scores = _read(export_dir)
    metadata = export.metadata
    data = _compute(metadata, scores)

    grouping = _resolve_groups(export, np.sort(data["_index"][data["_selected"]]), data["_index"], group_column, groups)
    composition, name = None, None
    if grouping is not None:
        sub_labels, pool_labels, default_name = grouping
        composition = _composition(sub_labels, pool_labels)
        name = group_name or default_name

    os.makedirs(output_dir, exist_ok=True)
    _plot_scores(data, os.path.join(output_dir, FIGURES["scores"]))
    _plot_votes(data, os.path.join(output_dir, FIGURES["votes"]))
    if len(data["tasks"]) > 1:
        _plot_heatmap(data, os.path.join(output_dir, FIGURES["heatmap"]))
    _plot_subset_overlap(data, os.path.join(output_dir, FIGURES["subset_overlap"]))
    if composition:
        _plot_composition(composition, name, os.path.join(output_dir, FIGURES["composition"]))

    public = {k: v for k, v in data.items() if not k.startswith("_")}
    public["composition"] = {"group_name": name, "groups": composition} if composition else None
    with open(os.path.join(output_dir, "report.json"), "w") as handle:
        json.dump(public, handle, indent=2)
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_markdown(metadata, data, composition, name))
    logger.info("Wrote the selection report of %s to %s", export_dir, path)
    return path
