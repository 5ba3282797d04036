"""The dataset card (``README.md``) of an export: Hub YAML metadata, then what was selected, how and why.

Every method, specialist, feature and projection is described by its registry entry (:mod:`icons_hf.rules`,
:mod:`icons_hf.specialists`, :mod:`icons_hf.features`), so a new entry appears here without edits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from .consensus import task_overlap, vote_histogram
from .features import describe_features
from .rules import RULES
from .settings import FeatureSettings, InfluenceSettings, SelectionSettings
from .specialists import SPECIALISTS

ICONS_CITATION = """@article{wu2025icons,
  title   = {ICONS: Influence Consensus for Vision-Language Data Selection},
  author  = {Wu, Xindi and Xia, Mengzhou and Shao, Rulin and Deng, Zhiwei and Koh, Pang Wei and Russakovsky, Olga},
  journal = {arXiv preprint arXiv:2501.00654},
  year    = {2025}
}"""

NOT_VERIFIED = "not verified"


def size_category(n: int) -> str:
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
    ):
        if n < bound:
            return label
    return "100M<n<1B"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _method_text(sel: dict) -> str:
    method = sel["method"]
    floor = float(sel.get("task_floor") or 0.0)
    if floor > 0 and sel.get("floor_rows_per_task") == 0 and not any((sel.get("floor_rows_by_task") or {}).values()):
        floor = 0.0  # fewer rows than tasks: the floors held no row and the method's ranking alone decided
    settings = sel.get("settings") or {}
    inclusive = settings.get("threshold_inclusive", sel.get("threshold_inclusive", False))
    tied = "threshold_percentile" in settings and settings["threshold_percentile"] is None
    votes = (
        f"a row gets one vote from each task whose influence score {'reaches' if inclusive else 'exceeds'} that task's "
        f"{sel['threshold_percentile']:g}th percentile"
        + (" (100 x (1 - fraction), as the released code)" if tied else "")
        if method == "vote"
        else ""
    )
    if method == "vote" and floor == 0:
        return (
            f"ICONS consensus voting (the paper's rule): {votes}; the rows with the most votes are kept (ties broken "
            "by the mean within-task percentile rank, then by row position)"
        )
    if method == "vote":
        return (
            f"ICONS consensus with per-task floors: {floor:.0%} of the subset is reserved in equal shares "
            f"({sel.get('floor_rows_per_task')} rows per task), each task taking its own highest-influence rows in "
            "turns so that a row wanted by several tasks counts once; the rest is ranked by votes "
            f"({votes}; ties by the mean within-task percentile rank, then by row position)"
        )
    text = RULES[method].describe(sel) if method in RULES else method
    by_task = sel.get("floor_rows_by_task")
    if floor > 0 and by_task:
        text += (
            f", after {floor:.0%} of the subset was reserved as per-task floors in proportion to the pool's task mix ("
            + ", ".join(f"{task} {rows}" for task, rows in by_task.items())
            + " rows) of each task's own highest-influence rows"
        )
    elif floor > 0:
        text += (
            f", after {floor:.0%} of the subset was reserved as equal per-task floors "
            f"({sel.get('floor_rows_per_task')} rows per task) of each task's own highest-influence rows"
        )
    return text


def specialist_entry(influence: dict):
    """The registered specialist a score table's provenance names, or ``None`` when it is not registered here."""
    return SPECIALISTS.get(influence.get("specialist", "mean"))


_STAGE_SETTINGS = {"features": FeatureSettings, "influence": InfluenceSettings, "selection": SelectionSettings}


def stage_settings(metadata: dict) -> dict[str, dict]:
    """Every stage's settings found in the provenance: a stage's ``"settings"`` dict when it has one, else the
    values of that stage's settings fields that the provenance records."""
    out = {}
    for stage, cls in _STAGE_SETTINGS.items():
        part = metadata.get(stage)
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("settings"), dict):
            out[stage] = dict(part["settings"])
        else:
            found = {f.name: part[f.name] for f in dataclasses.fields(cls) if f.name in part}
            if found:
                out[stage] = found
    return out


def _settings_section(metadata: dict) -> list[str]:
    settings = stage_settings(metadata)
    if not settings:
        return []
    rows = [
        [stage, f"`{name}`", "none" if value is None else f"`{json.dumps(value)}`"]
        for stage, values in settings.items()
        for name, value in values.items()
    ]
    return [
        "",
        "## Settings",
        "",
        "Every setting of the stages that made this selection (also in `selection.json`):",
        "",
        markdown_table(["stage", "setting", "value"], rows),
    ]


def _card_selection(metadata: dict, title: str) -> list[str]:
    sel, pool = metadata["selection"], metadata["pool"]
    n_sel, n_pool = metadata["num_selected"], pool["num_rows"]
    identity = str(metadata.get("row_identity") or NOT_VERIFIED)
    parts = [
        f"# {title}",
        "",
        f"This dataset holds **{n_sel:,} of the {n_pool:,} rows** ({n_sel / max(n_pool, 1):.1%}) of the "
        f"instruction pool `{pool['name']}`, chosen with ICONS (Influence Consensus, arXiv:2501.00654) for several "
        "target tasks at once. "
        f"Rows are the pool's original records, unchanged, in their original order.",
        "",
        "## Selection",
        "",
        markdown_table(
            ["setting", "value"],
            [
                ["pool", f"`{pool['name']}` ({pool['format']}, {n_pool:,} rows)"],
                ["rows selected", f"{n_sel:,}"],
                ["method", f"`{sel['method']}`: {_method_text(sel)}"],
                ["fraction", sel["fraction"] if sel["fraction"] is not None else "n/a (fixed count)"],
                ["row identity", identity],
                ["library", f"icons_hf {metadata['library']['version']}"],
            ],
        ),
    ]
    if identity.startswith(NOT_VERIFIED):
        parts += [
            "",
            "**Row identity not verified**: the score table carried no per-row record hash, so the rows were "
            "taken from the pool by position only. Use this subset only if the pool was passed to the "
            "gradient stage unchanged and in this order.",
        ]
    return parts


def _card_tasks(inf: dict, sel: dict, scores) -> list[str]:
    if not inf:
        return []
    overlap = task_overlap(scores)
    thresholds = sel.get("thresholds") or {}
    rows = []
    entry = specialist_entry(inf)
    for task, subs in inf["num_validation"].items():
        n_val = sum(subs.values())
        pooled = entry.subtasks if entry else "combined by the specialist"
        sub_text = "" if list(subs) == [task] else f" ({len(subs)} subtasks, {pooled})"
        rows.append(
            [
                task,
                f"{n_val}{sub_text}",
                f"{thresholds[task]:.4g}" if task in thresholds else "-",
                f"{overlap[task]:.1%}",
            ]
        )
    return [
        "",
        "## Target tasks",
        "",
        (entry.card_text if entry else f"Specialist `{inf.get('specialist')}`.")
        + " *Overlap* is the share of the task's own top rows (as many as were selected) that the selection contains.",
        "",
        markdown_table(["task", "validation rows", "threshold", "overlap with task's top rows"], rows),
        "",
        "## Gradient features",
        "",
        markdown_table(
            ["checkpoint", "learning rate", "weight"],
            [
                [c or f"#{k}", "-" if lr is None else f"{lr:.3g}", f"{w:.3f}"]
                for k, (c, lr, w) in enumerate(
                    zip(inf["checkpoints"], inf["learning_rates"], inf["checkpoint_weights"], strict=True)
                )
            ],
        ),
        "",
        features_text(inf),
    ]


def features_text(inf: dict) -> str:
    """The features' sentence: the train side's feature type and projection, as their registry entries describe
    them, with their recorded parameters."""
    precond, projection = inf["preconditioner"], inf["projection"]
    params = {k: v for k, v in precond.items() if k != "feature"}
    extra = ", ".join(f"{k} `{json.dumps(v)}`" for k, v in params.items())
    return (
        f"Train side: {describe_features(precond['feature'], projection['kind'])}; dimension {projection['dim']}, "
        f"seed {projection['seed']}" + (f"; {extra}" if extra else "") + ". Validation side: plain gradients (`sgd`)."
    )


def _card_features(metadata: dict) -> list[str]:
    """Which feature settings the scores came from (``features`` of the provenance), in one sentence."""
    features = metadata.get("features")
    if not isinstance(features, dict) or not isinstance(features.get("settings"), dict):
        return []
    values = features["settings"]
    described = ", ".join(f"`{k}={json.dumps(values.get(k))}`" for k in
                          ("train_feature", "parameters", "projection", "dim", "seed"))
    presets = features.get("presets") or []
    match = f"those of the `{'`/`'.join(presets)}` preset" if presets else "those of no preset"
    return ["", f"Feature settings of the stores: {described}; {match}."]


def _card_skipped(inf: dict) -> list[str]:
    skipped = inf.get("skipped", [])
    parts = ["", "## Skipped rows", ""]
    if not skipped:
        return parts + ["None: every pool row was scored."]
    parts += [
        f"{len(skipped)} pool rows gave no gradient feature and could not be selected:",
        "",
        markdown_table(["row", "reason"], [[s["index"], s["reason"]] for s in skipped[:50]]),
    ]
    if len(skipped) > 50:
        parts.append(f"\n... and {len(skipped) - 50} more (see `selection.json`).")
    return parts


def render_card(
    metadata: dict, scores, *, license: str, pretty_name: str | None, task_categories: list[str], tags: list[str]
) -> str:
    """The dataset card (README.md) text: Hub YAML metadata followed by a readable account of the selection."""
    from huggingface_hub import DatasetCardData

    sel, inf, pool = metadata["selection"], metadata.get("influence", {}), metadata["pool"]
    title = pretty_name or f"{pool['name']}: ICONS selection of {metadata['num_selected']:,} rows"
    data_files = "data/*.parquet" if pool["format"] == "hf" else metadata["subset_file"]
    card_data = DatasetCardData(
        license=license,
        pretty_name=title,
        task_categories=task_categories,
        size_categories=[size_category(metadata["num_selected"])],
        tags=sorted({"icons", "data-selection", "influence-functions", *tags}),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
    )
    parts = _card_selection(metadata, title) + _card_tasks(inf, sel, scores) + _card_features(metadata)
    if sel["method"] == "vote" and "votes" in scores.column_names:
        hist = vote_histogram(scores)
        parts += [
            "",
            "## Votes",
            "",
            markdown_table(
                ["votes", "pool rows", "selected rows"], [[v, h["pool"], h["selected"]] for v, h in hist.items()]
            ),
        ]
    parts += _settings_section(metadata) + _card_skipped(inf)
    parts += [
        "",
        "## Files",
        "",
        f"- `{data_files}`: the selected rows.",
        "- `scores.parquet`: one row per pool row with its per-task influence, votes and whether it was selected; "
        "re-threshold without recomputing gradients.",
        "- `indices.json`: the selected pool positions. `selection.json`: every setting above, machine-readable.",
        "",
        "## Citation",
        "",
        "```bibtex",
        ICONS_CITATION,
        "```",
        "",
    ]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(parts)


__all__ = ["ICONS_CITATION", "NOT_VERIFIED", "features_text", "markdown_table", "render_card", "size_category",
           "specialist_entry", "stage_settings"]
