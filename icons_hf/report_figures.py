"""The figures of a selection report (PNG, matplotlib's object API: no global state, no display needed).

Each function draws one figure from the numbers of :func:`icons_hf.report_numbers.report_numbers` into ``path``.
"""

from __future__ import annotations

import math

import numpy as np

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


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_scores(data: dict, path: str) -> None:
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


def plot_votes(data: dict, path: str) -> None:
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


def plot_heatmap(data: dict, path: str) -> None:
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


def plot_subset_overlap(data: dict, path: str) -> None:
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


def plot_composition(rows: list[dict], group_name: str, path: str) -> None:
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


__all__ = ["FIGURES", "plot_composition", "plot_heatmap", "plot_scores", "plot_subset_overlap", "plot_votes"]
