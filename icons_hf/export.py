"""Export a selection in the pool's own format, with the score table and a dataset card.

Output folder::

    README.md            dataset card (YAML metadata + what was selected, how and why)
    selection.json       provenance: pool, tasks, checkpoints and weights, projection, selection parameters
    indices.json         selected pool positions, ascending
    scores.parquet       the score table: index, influence_<task>..., votes, consensus, tiebreak, selected
    data/train-*.parquet the selected rows, when the pool is a ``datasets.Dataset``
    <pool name>.json(l)  the selected original records, when the pool is LLaVA-style JSON/JSONL

Rows are selected by position, so pools with repeated ids (LLaVA-665K has them) export correctly, and the
records are written unchanged in their original order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from . import __version__
from .influence import provenance

logger = logging.getLogger(__name__)

ICONS_CITATION = """@article{wu2025icons,
  title   = {ICONS: Influence Consensus for Vision-Language Data Selection},
  author  = {Wu, Xindi and Xia, Mengzhou and Shao, Rulin and Deng, Zhiwei and Koh, Pang Wei and Russakovsky, Olga},
  journal = {arXiv preprint arXiv:2501.00654},
  year    = {2025}
}"""

_ROWS_PER_PARQUET = 100_000


def load_llava_records(path: str | os.PathLike) -> list[dict]:
    """Records of a LLaVA-style ``.json`` (a list) or ``.jsonl`` (one object per line) file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pool file {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}, line {line_no}: not valid JSON ({err.msg}).") from None
        else:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (LLaVA format), got {type(records).__name__}.")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: row {i} is a {type(record).__name__}, not a record object.")
    return records


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < bound:
            return label
    return "100M<n<1B"


def _selected_positions(scores, pool_rows: int) -> np.ndarray:
    for col in ("index", "selected"):
        if col not in scores.column_names:
            raise ValueError(f"the score table has no {col!r} column; pass the output of select().")
    from .consensus import column_arrays

    table = column_arrays(scores, ["index", "selected"])
    index, selected = table["index"].astype(np.int64), table["selected"].astype(bool)
    if len(index) and (index.min() < 0 or index.max() >= pool_rows):
        raise ValueError(
            f"the score table refers to row {int(index.max())} but the pool has {pool_rows} rows; export with the pool "
            "the features were computed on."
        )
    if len(np.unique(index)) != len(index):
        raise ValueError("the score table lists a row index twice; it was not produced by compute_influence.")
    return np.sort(index[selected])


def export_selection(
    pool,
    scores,
    output_dir: str | os.PathLike,
    *,
    pool_name: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    task_categories: Sequence[str] | None = None,
    tags: Sequence[str] = (),
) -> str:
    """Write the selected rows of ``pool`` in its own format, the score table and a dataset card.

    Args:
        pool: the pool the scores were computed on: a ``datasets.Dataset``, a folder saved with
            ``Dataset.save_to_disk``, or a LLaVA-style ``.json``/``.jsonl`` file.
        scores: the output of :func:`icons_hf.select`.
        output_dir: folder to write (created; existing files of the same names are replaced).
        pool_name: name of the pool in the card (default: the file or folder name).
        license: the subset's license for the card's YAML (the pool's license; ``"other"`` when unknown).
        pretty_name: title of the card.
        task_categories: Hub task categories for the card (default ``visual-question-answering`` for image
            pools, else ``text-generation``).
        tags: extra Hub tags.

    Returns:
        ``output_dir``.
    """
    from datasets import Dataset, load_from_disk

    output_dir = os.fspath(output_dir)
    info = provenance(scores)
    if "selection" not in info:
        raise ValueError("scores carry no selection; call icons_hf.select(scores) before exporting.")
    records, dataset, fmt, subset_file = None, None, None, None
    if isinstance(pool, Dataset):
        dataset, fmt = pool, "hf"
        pool_name = pool_name or "dataset"
    elif isinstance(pool, (str, os.PathLike)) and os.path.isdir(pool):
        dataset, fmt = load_from_disk(os.fspath(pool)), "hf"
        pool_name = pool_name or os.path.basename(os.path.normpath(os.fspath(pool)))
    elif isinstance(pool, (str, os.PathLike)):
        path = os.fspath(pool)
        if not path.endswith((".json", ".jsonl")):
            raise ValueError(f"pool {path}: expected a .json/.jsonl LLaVA file, a saved dataset folder or a Dataset.")
        records = load_llava_records(path)
        fmt = "llava_jsonl" if path.endswith(".jsonl") else "llava_json"
        stem = os.path.splitext(os.path.basename(path))[0]
        pool_name = pool_name or stem
        subset_file = f"{stem}_icons{os.path.splitext(path)[1]}"
    else:
        raise TypeError(f"pool of type {type(pool).__name__} is not supported; pass a Dataset or a LLaVA JSON path.")
    n_pool = len(dataset) if dataset is not None else len(records)
    expected = info.get("influence", {}).get("pool_rows")
    if expected is not None and expected != n_pool:
        raise ValueError(
            f"the scores were computed on a pool of {expected} rows but {pool_name} has {n_pool}; export with the same pool."
        )
    positions = _selected_positions(scores, n_pool)
    os.makedirs(output_dir, exist_ok=True)

    has_images = False
    if fmt == "hf":
        subset = dataset.select(positions.tolist())
        data_dir = os.path.join(output_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        for old in os.listdir(data_dir):
            if old.startswith("train-") and old.endswith(".parquet"):
                os.remove(os.path.join(data_dir, old))
        shards = max(1, math.ceil(len(subset) / _ROWS_PER_PARQUET))
        for k in range(shards):
            subset.shard(shards, k, contiguous=True).to_parquet(
                os.path.join(data_dir, f"train-{k:05d}-of-{shards:05d}.parquet")
            )
        has_images = any(type(f).__name__ == "Image" for f in dataset.features.values()) or "pixel_values" in dataset.column_names
    else:
        chosen = [records[i] for i in positions]
        out_path = os.path.join(output_dir, subset_file)
        with open(out_path, "w", encoding="utf-8") as handle:
            if fmt == "llava_jsonl":
                for record in chosen:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                json.dump(chosen, handle, ensure_ascii=False)
        has_images = any("image" in r for r in records[: min(len(records), 1000)])

    with open(os.path.join(output_dir, "indices.json"), "w") as handle:
        json.dump(positions.tolist(), handle)
    scores.to_parquet(os.path.join(output_dir, "scores.parquet"))
    metadata = {
        "library": {"name": "icons_hf", "version": __version__},
        "pool": {"name": pool_name, "format": fmt, "num_rows": n_pool, "path": None if dataset is not None and isinstance(pool, Dataset) else os.fspath(pool)},
        "subset_file": subset_file,
        "num_selected": int(len(positions)),
        **info,
    }
    with open(os.path.join(output_dir, "selection.json"), "w") as handle:
        json.dump(metadata, handle, indent=2)
    card = render_card(
        metadata,
        scores,
        license=license or "other",
        pretty_name=pretty_name,
        task_categories=list(task_categories or (["visual-question-answering"] if has_images else ["text-generation"])),
        tags=list(tags),
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    logger.info("Exported %d of %d rows to %s", len(positions), n_pool, output_dir)
    return output_dir


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _method_text(sel: dict) -> str:
    method = sel["method"]
    floor = float(sel.get("task_floor") or 0.0)
    if floor > 0 and sel.get("floor_rows_per_task") == 0:
        floor = 0.0  # fewer rows than tasks: the floors held no row and the method's ranking alone decided
    votes = (
        "a row gets one vote from each task whose influence score exceeds that task's "
        f"{sel['threshold_percentile']:g}th percentile" if method == "vote" else ""
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
    if method == "task":
        text = f"the influence on the single task {sel.get('task')!r} (LESS-style)"
    elif method == "random":
        text = f"a uniformly random subset (seed {sel.get('seed')})"
    else:
        text = {
            "mean": "the mean of the per-task influence scores",
            "max": "the maximum of the per-task influence scores",
            "rank": "the mean within-task percentile rank",
            "norm": "the mean of per-task z-scored influence scores",
        }.get(method, method)
    if floor > 0:
        text += (
            f", after {floor:.0%} of the subset was reserved as equal per-task floors "
            f"({sel.get('floor_rows_per_task')} rows per task) of each task's own highest-influence rows"
        )
    return text


_SPECIALIST_TEXT = {
    "mean": (
        "Influence of a pool row on a task is the mean cosine similarity between its gradient feature and the task's "
        "validation gradient features (the ICONS paper's specialist), summed over checkpoints with the weights below."
    ),
    "balanced": (
        "Influence of a pool row on a task is the highest within-pool percentile rank it reaches for any one of the "
        "task's validation examples, by the cosine similarity of gradient features summed over checkpoints with the "
        "weights below; every validation example thus contributes about the same number of top rows."
    ),
    "zscore": (
        "Influence of a pool row on a task is the mean over the task's validation examples of its z-scored cosine "
        "similarity with that example's gradient feature (standardised over the pool, summed over checkpoints with "
        "the weights below)."
    ),
}


def _specialist(inf: dict) -> str:
    name = inf.get("specialist", "mean")
    return {"balanced-quota": "balanced", "balanced-zscore": "zscore"}.get(name, name)


def render_card(metadata: dict, scores, *, license: str, pretty_name: str | None, task_categories: list[str], tags: list[str]) -> str:
    """The dataset card (README.md) text: Hub YAML metadata followed by a readable account of the selection."""
    from huggingface_hub import DatasetCardData

    from .consensus import task_overlap, vote_histogram

    sel = metadata["selection"]
    inf = metadata.get("influence", {})
    pool = metadata["pool"]
    n_sel, n_pool = metadata["num_selected"], pool["num_rows"]
    title = pretty_name or f"{pool['name']}: ICONS selection of {n_sel:,} rows"
    data_files = "data/*.parquet" if pool["format"] == "hf" else metadata["subset_file"]
    card_data = DatasetCardData(
        license=license,
        pretty_name=title,
        task_categories=task_categories,
        size_categories=[size_category(n_sel)],
        tags=sorted({"icons", "data-selection", "influence-functions", *tags}),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
    )
    method_text = _method_text(sel)
    parts = [
        f"# {title}",
        "",
        f"This dataset holds **{n_sel:,} of the {n_pool:,} rows** ({n_sel / max(n_pool, 1):.1%}) of the instruction pool "
        f"`{pool['name']}`, chosen with ICONS (Influence Consensus, arXiv:2501.00654) for several target tasks at once. "
        f"Rows are the pool's original records, unchanged, in their original order.",
        "",
        "## Selection",
        "",
        _md_table(
            ["setting", "value"],
            [
                ["pool", f"`{pool['name']}` ({pool['format']}, {n_pool:,} rows)"],
                ["rows selected", f"{n_sel:,}"],
                ["method", f"`{sel['method']}`: {method_text}"],
                ["fraction", sel["fraction"] if sel["fraction"] is not None else "n/a (fixed count)"],
                ["library", f"icons_hf {metadata['library']['version']}"],
            ],
        ),
    ]
    if inf:
        overlap = task_overlap(scores)
        thresholds = sel.get("thresholds") or {}
        rows = []
        for task, subs in inf["num_validation"].items():
            n_val = sum(subs.values())
            pooled = "max over subtasks" if _specialist(inf) == "mean" else "examples pooled"
            sub_text = "" if list(subs) == [task] else f" ({len(subs)} subtasks, {pooled})"
            rows.append([task, f"{n_val}{sub_text}", f"{thresholds[task]:.4g}" if task in thresholds else "-", f"{overlap[task]:.1%}"])
        parts += [
            "",
            "## Target tasks",
            "",
            _SPECIALIST_TEXT.get(_specialist(inf), f"Specialist `{_specialist(inf)}`.")
            + " *Overlap* is the share of the task's own top rows (as many as were selected) that the selection "
            "contains.",
            "",
            _md_table(["task", "validation rows", "threshold", "overlap with task's top rows"], rows),
            "",
            "## Gradient features",
            "",
            _md_table(
                ["checkpoint", "learning rate", "weight"],
                [[c or f"#{k}", "-" if lr is None else f"{lr:.3g}", f"{w:.3f}"]
                 for k, (c, lr, w) in enumerate(zip(inf["checkpoints"], inf["learning_rates"], inf["checkpoint_weights"]))],
            ),
            "",
            f"Projection: `{inf['projection']['kind']}`, dimension {inf['projection']['dim']}, seed {inf['projection']['seed']}. "
            f"Train-side feature: `{inf['preconditioner']['feature']}`"
            + (f" (Adam variant `{inf['preconditioner']['adam_variant']}`)" if inf["preconditioner"]["feature"] == "adam" else "")
            + "; validation side: SGD gradients.",
        ]
    if sel["method"] == "vote" and "votes" in scores.column_names:
        hist = vote_histogram(scores)
        parts += ["", "## Votes", "", _md_table(["votes", "pool rows", "selected rows"], [[v, h["pool"], h["selected"]] for v, h in hist.items()])]
    skipped = inf.get("skipped", [])
    parts += ["", "## Skipped rows", ""]
    if skipped:
        parts.append(f"{len(skipped)} pool rows gave no gradient feature and could not be selected:")
        parts.append("")
        parts.append(_md_table(["row", "reason"], [[s["index"], s["reason"]] for s in skipped[:50]]))
        if len(skipped) > 50:
            parts.append(f"\n... and {len(skipped) - 50} more (see `selection.json`).")
    else:
        parts.append("None: every pool row was scored.")
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
