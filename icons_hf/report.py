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

Definitions (the same as :func:`icons_hf.select`, counted with the same function,
:func:`icons_hf.rules.vote_hits`): task ``k``'s *top set* is the rows whose influence exceeds ``tau_k`` (or
reaches it, when the selection used ``threshold_inclusive``), the task's ``threshold_percentile``-th percentile
(NumPy's linear interpolation); a row's *votes* are the number of top sets holding it. The overlap of task ``a``
with task ``b`` is ``|top_a & top_b| / |top_a|``. A selection made with another method than ``vote`` is reported
against the thresholds of the 80th percentile. The numbers are :mod:`icons_hf.report_numbers`, the figures
:mod:`icons_hf.report_figures`; the method, specialist and features are described by their registry entries.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .card import markdown_table
from .export import ExportFolder, read_export
from .features import describe_features
from .pools import group_label, is_records_format, load_pool
from .ranks import column_arrays, task_columns
from .report_figures import (
    FIGURES,
    plot_composition,
    plot_heatmap,
    plot_scores,
    plot_subset_overlap,
    plot_votes,
)
from .report_numbers import composition_rows, report_numbers
from .rules import RULES

logger = logging.getLogger(__name__)

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
        out.append(group_label(groups[row]))
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


def _pool_groups(export: ExportFolder, pool_index, group_column):
    """The subset's group labels, and the scored pool rows' when the pool is still reachable (the grouping is
    the pool's own: :meth:`icons_hf.pools.Pool.group_labels`)."""
    if group_column is None and not is_records_format(export.format):
        logger.info("No group_column= given for a datasets pool; the report has no composition section.")
        return None
    found = export.subset_pool().group_labels(group_column)
    if found is None:
        logger.info(
            "The records have no source field or image folders; pass group_column= or groups= for a "
            "composition section."
        )
        return None
    sub_labels, name = found
    pool_labels = None
    pool = _reachable_pool(export)
    if pool is not None:
        pool_found = pool.group_labels(group_column)
        if pool_found is not None:
            pool_labels = [pool_found[0][int(i)] for i in pool_index]
    return sub_labels, pool_labels, name


def _resolve_groups(export: ExportFolder, positions, pool_index, group_column, groups):
    """Group labels of the subset rows and, when the pool is reachable, of every scored pool row.

    Returns ``(subset_labels, pool_labels or None, group_name)`` or ``None`` when no grouping applies.
    """
    if groups is not None:
        if group_column is not None:
            raise ValueError("pass either group_column= or groups=, not both.")
        return _lookup_groups(groups, positions), _lookup_groups(groups, pool_index), "group"
    return _pool_groups(export, pool_index, group_column)

# --------------------------------------------------------------------------------------------------- page


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _floor_text(sel: Mapping) -> str:
    floor = float(sel.get("task_floor") or 0)
    if floor <= 0:
        return "none (the subset is ranked by the method alone" + (
            ", the ICONS paper's rule)" if sel["method"] == "vote" else ")"
        )
    rows, by_task = sel.get("floor_rows_per_task"), sel.get("floor_rows_by_task")
    if by_task:
        return f"{floor:.0%} of the subset reserved in proportion to the pool's task mix: " + ", ".join(
            f"{task} {n:,}" for task, n in by_task.items())
    return f"{floor:.0%} of the subset reserved in equal shares" + (
        f": each task's own top {rows:,} rows" if rows else ""
    )


def _features_text(influence: Mapping) -> str:
    precond, projection = influence.get("preconditioner") or {}, influence.get("projection") or {}
    return describe_features(precond.get("feature"), projection.get("kind")) or "not recorded"


def _md_settings(metadata: Mapping, data: dict) -> list[str]:
    sel, pool = metadata["selection"], metadata["pool"]
    tasks, n, n_sel, pct = data["tasks"], data["num_candidates"], data["num_selected"], data["threshold_percentile"]
    influence = metadata.get("influence", {})
    skipped = influence.get("skipped", [])
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
                ["method", f"`{sel['method']}`" + (f": {RULES[sel['method']].describe(sel)}" if sel["method"] in RULES
                                                   else "")],
                ["per-task floor", _floor_text(sel)],
                ["specialist", f"`{influence.get('specialist', 'mean')}` ({data['score_kind']})"],
                ["features", _features_text(influence)],
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
        f"scores; rows {'at or above' if data['threshold_inclusive'] else 'above'} it form the task's *top set* and "
        "give the row that task's vote. In each task's panel the selected rows are split at that task's threshold: "
        "light orange marks selected rows below it, picked for the other tasks.",
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
    data = report_numbers(metadata, scores)

    grouping = _resolve_groups(export, np.sort(data["_index"][data["_selected"]]), data["_index"], group_column, groups)
    composition, name = None, None
    if grouping is not None:
        sub_labels, pool_labels, default_name = grouping
        composition = composition_rows(sub_labels, pool_labels)
        name = group_name or default_name

    os.makedirs(output_dir, exist_ok=True)
    plot_scores(data, os.path.join(output_dir, FIGURES["scores"]))
    plot_votes(data, os.path.join(output_dir, FIGURES["votes"]))
    if len(data["tasks"]) > 1:
        plot_heatmap(data, os.path.join(output_dir, FIGURES["heatmap"]))
    plot_subset_overlap(data, os.path.join(output_dir, FIGURES["subset_overlap"]))
    if composition:
        plot_composition(composition, name, os.path.join(output_dir, FIGURES["composition"]))

    public = {k: v for k, v in data.items() if not k.startswith("_")}
    public["composition"] = {"group_name": name, "groups": composition} if composition else None
    with open(os.path.join(output_dir, "report.json"), "w") as handle:
        json.dump(public, handle, indent=2)
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_markdown(metadata, data, composition, name))
    logger.info("Wrote the selection report of %s to %s", export_dir, path)
    return path
