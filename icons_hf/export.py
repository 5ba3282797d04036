"""Export a selection in the pool's own format, with the score table and a dataset card.

Output folder::

    README.md            dataset card (YAML metadata + what was selected, how and why)
    selection.json       provenance: pool, tasks, checkpoints and weights, projection, every stage's settings
    indices.json         selected pool positions, ascending
    scores.parquet       the score table: index, influence_<task>..., votes, consensus, tiebreak, selected
    data/train-*.parquet the selected rows, when the pool is a ``datasets.Dataset``
    <pool name>.json(l)  the selected original records, when the pool is a JSON/JSONL records file

Rows are selected by position, so pools with repeated ids (LLaVA-665K has them) export correctly, and the
records are written unchanged in their original order. When the score table carries each row's
``record_hash`` (pools formatted by ``icons_hf.data.prepare_*``), the pool given here must hold the same records
in the same order, or the export is refused; without it the export says the row identity was not verified.

The card's text is :mod:`icons_hf.card`. :func:`read_export` reads such a folder back
(``icons_hf.push_selection`` and ``icons_hf.write_report`` use it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .card import NOT_VERIFIED, render_card
from .pools import (
    INPUT_HASH_COLUMN,
    POOL_FORMATS,
    RECORD_HASH_COLUMN,
    Pool,
    check_row_identity,
    column_values,
    input_hashes,
    is_records_format,
    load_pool,
    load_records,
    record_hash,
)
from .provenance import provenance
from .ranks import column_arrays

logger = logging.getLogger(__name__)

EXPORT_FILES = ("README.md", "selection.json", "indices.json", "scores.parquet", "data")
__all__ = ["ExportFolder", "export_selection", "read_export"]


def _selected_positions(scores, pool: Pool) -> np.ndarray:
    table = column_arrays(scores, ["index", "selected"])
    index, selected = table["index"].astype(np.int64), table["selected"].astype(bool)
    if len(np.unique(index)) != len(index):
        raise ValueError("the score table lists a row index twice; it was not produced by compute_influence.")
    if len(index) and (index.min() < 0 or index.max() >= len(pool)):
        raise ValueError(
            f"pool {pool.name!r} has {len(pool)} rows but the score table refers to row {int(index.max())}; export "
            "with the pool the features were computed on."
        )
    return np.sort(index[selected])


def _verify_identity(pool: Pool, scores, expected_rows: int | None) -> str:
    """Refuse a pool that is not the scored one; returns how the row identity was established."""
    n_pool = len(pool)
    hashed = RECORD_HASH_COLUMN in scores.column_names
    if hashed:
        index = column_arrays(scores, ["index"])["index"].astype(np.int64)
        hashes = np.asarray(column_values(scores, RECORD_HASH_COLUMN), dtype=object)
        inside = (index >= 0) & (index < n_pool)
        check_row_identity(pool.hashes(), index[inside], hashes[inside], pool.name)
        if not inside.all():
            expected_rows = max(expected_rows or 0, int(index.max()) + 1)
    if expected_rows is not None and expected_rows != n_pool:
        first = min(expected_rows, n_pool)
        raise ValueError(
            f"pool {pool.name!r} has {n_pool} rows but the scores were computed on a pool of {expected_rows} rows "
            f"(row {first} on {'is missing' if n_pool < expected_rows else 'was added'}); export with the exact pool "
            "that was passed to the gradient stage."
        )
    if hashed:
        return f"verified: every scored row's {RECORD_HASH_COLUMN} matches the pool's record at that position"
    if INPUT_HASH_COLUMN in scores.column_names and pool.dataset is not None:
        return _verify_input_hashes(pool, scores)
    logger.warning(
        "Row identity not verified: the score table has no %r column (the pool was not formatted with "
        "icons_hf.data.prepare_*)%s, so rows are taken by position only. Make sure %r is the pool the features were "
        "computed on, in the same order.",
        RECORD_HASH_COLUMN,
        "" if INPUT_HASH_COLUMN not in scores.column_names else
        f" and its {INPUT_HASH_COLUMN} (of tokenized rows) cannot be checked against a records file",
        pool.name,
    )
    return f"{NOT_VERIFIED}: the score table has no {RECORD_HASH_COLUMN} column, rows were taken by position"


def _verify_input_hashes(pool: Pool, scores) -> str:
    """Refuse a tokenized pool whose rows' model inputs are not the scored ones at the scored positions."""
    columns = (provenance(scores).get("influence") or {}).get("input_hash_columns") or ["input_ids", "labels"]
    index = column_arrays(scores, ["index"])["index"].astype(np.int64)
    hashes = np.asarray(column_values(scores, INPUT_HASH_COLUMN), dtype=object)
    found = np.full(len(pool), None, dtype=object)
    found[index] = input_hashes(pool.dataset, columns, index.tolist())
    check_row_identity(found, index, hashes, pool.name)
    return (f"verified: every scored row's {INPUT_HASH_COLUMN} (of {', '.join(columns)}) matches the pool's row at "
            "that position")


def _previous_export(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, "selection.json")
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError):
        return None
    ours = isinstance(metadata, dict) and (metadata.get("library") or {}).get("name") == "icons_hf"
    return metadata if ours else None


def _prepare_output_dir(output_dir: str, subset_file: str | None) -> None:
    """Create ``output_dir``; refuse to write over files that no export wrote (a user's own README.md, data/ ...)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"output_dir {output_dir} is a file; pass a folder to write the export into.")
    previous = _previous_export(output_dir) if os.path.isdir(output_dir) else None
    if previous is None:
        clashes = [
            name for name in (*EXPORT_FILES, subset_file) if name and os.path.exists(os.path.join(output_dir, name))
        ]
        if clashes:
            raise FileExistsError(
                f"output_dir {output_dir} already holds {clashes[0]}, which no icons_hf export wrote; export into an "
                f"empty or new folder (the export writes {', '.join(n for n in (subset_file, *EXPORT_FILES) if n)})."
            )
    else:
        old_subset = previous.get("subset_file")
        if old_subset and old_subset != subset_file and os.path.isfile(os.path.join(output_dir, old_subset)):
            os.remove(os.path.join(output_dir, old_subset))
    data_dir = os.path.join(output_dir, "data")
    if os.path.isdir(data_dir):
        for old in os.listdir(data_dir):
            if old.startswith("train-") and old.endswith(".parquet"):
                os.remove(os.path.join(data_dir, old))
    os.makedirs(output_dir, exist_ok=True)


def _score_table(scores):
    from datasets import Dataset, load_from_disk

    if isinstance(scores, (str, os.PathLike)):
        path = os.fspath(scores)
        try:
            scores = load_from_disk(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"scores {path} is not a score table folder; pass the folder written by 'icons-hf select' or the "
                "Dataset that icons_hf.select returned."
            ) from None
    if not isinstance(scores, Dataset):
        raise TypeError(
            f"scores of type {type(scores).__name__} is not supported; pass the Dataset that icons_hf.select returned "
            "(or the folder it was saved to)."
        )
    return scores


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
            ``Dataset.save_to_disk``, or a ``.json``/``.jsonl`` records file (LLaVA or chat records).
        scores: the output of :func:`icons_hf.select` (or the folder it was saved to).
        output_dir: folder to write (created). A folder holding a previous export is updated; files of the same
            names that no export wrote (a README.md of your own, ...) are never replaced: that is an error.
        pool_name: name of the pool in the card (default: the file or folder name).
        license: the subset's license for the card's YAML (the pool's license; ``"other"`` when unknown).
        pretty_name: title of the card.
        task_categories: Hub task categories for the card (default ``visual-question-answering`` for image
            pools, else ``text-generation``).
        tags: extra Hub tags.

    Returns:
        ``output_dir``.

    Raises:
        ValueError: the pool is not the one that was scored (another length, or, when the score table carries
            ``record_hash``, other records or another order: the first mismatching row is named).
        FileExistsError: ``output_dir`` holds files of the export's names that no export wrote.
    """
    output_dir = os.fspath(output_dir)
    if isinstance(task_categories, str):  # one category, not its letters
        task_categories = [task_categories]
    tags = [tags] if isinstance(tags, str) else list(tags)
    matched = _match_pool(pool, scores, pool_name)
    _prepare_output_dir(output_dir, matched.subset_file)
    matched.pool.write_subset(matched.positions, output_dir)
    metadata = _write_tables(output_dir, matched)
    card = render_card(
        metadata,
        matched.scores,
        license=license or "other",
        pretty_name=pretty_name,
        task_categories=list(task_categories or (["visual-question-answering"] if matched.pool.has_images()
                                                 else ["text-generation"])),
        tags=list(tags),
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    logger.info("Exported %d of %d rows to %s (row identity %s)", len(matched.positions), len(matched.pool), output_dir,
                matched.identity.split(":")[0])
    return output_dir


@dataclass(frozen=True)
class _MatchedSelection:
    """A score table checked against its pool: what :func:`export_selection` writes, row by row."""

    pool: Pool
    scores: Any  # the score table, a datasets.Dataset
    info: dict[str, Any]  # its provenance
    identity: str  # how the row identity was established (see _verify_identity)
    positions: np.ndarray  # the selected rows' positions in the pool, ascending
    subset_file: str | None  # name of the subset's records file; None for a pool written as Parquet shards


def _match_pool(pool, scores, pool_name: str | None) -> _MatchedSelection:
    """Load the score table and the pool; refuse a table without a selection or a pool that is not the scored one."""
    scores = _score_table(scores)
    info = provenance(scores)
    if "selection" not in info:
        raise ValueError("scores carry no selection; call icons_hf.select(scores) before exporting.")
    for col in ("index", "selected"):
        if col not in scores.column_names:
            raise ValueError(f"the score table has no {col!r} column; pass the output of icons_hf.select().")
    pool = load_pool(pool, name=pool_name)
    identity = _verify_identity(pool, scores, info.get("influence", {}).get("pool_rows"))
    positions = _selected_positions(scores, pool)
    return _MatchedSelection(pool, scores, info, identity, positions, pool.subset_file())


def _write_tables(output_dir: str, matched: _MatchedSelection) -> dict[str, Any]:
    """Write indices.json, scores.parquet and selection.json; returns the metadata written to selection.json."""
    pool, positions = matched.pool, matched.positions
    with open(os.path.join(output_dir, "indices.json"), "w") as handle:
        json.dump(positions.tolist(), handle)
    matched.scores.to_parquet(os.path.join(output_dir, "scores.parquet"))
    metadata = {
        "library": {"name": "icons_hf", "version": __version__},
        "pool": {"name": pool.name, "format": pool.format, "num_rows": len(pool), "path": pool.path},
        "subset_file": matched.subset_file,
        "num_selected": int(len(positions)),
        "row_identity": matched.identity,
        **matched.info,
    }
    with open(os.path.join(output_dir, "selection.json"), "w") as handle:
        json.dump(metadata, handle, indent=2)
    return metadata


# -------------------------------------------------------------------------------------------- reading back


@dataclass
class ExportFolder:
    """A folder written by :func:`export_selection`, checked: ``metadata`` (selection.json) and ``indices``."""

    path: Path
    metadata: dict[str, Any]
    indices: list[int]

    @property
    def format(self) -> str:
        return self.metadata["pool"]["format"]

    def file(self, name: str) -> Path:
        """Path of one of the export's files; an error naming it (and the fix) when it is missing."""
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: {self.path} is not a complete ICONS export. Write it with "
                "icons_hf.export_selection(pool, scores, output_dir) first."
            )
        return path

    def subset_records(self) -> tuple[list[dict], Path]:
        """The selected records of a records-file export, and that file's path. When the score table carries
        ``record_hash``, every record must still be the one selected at its position (the file was not edited)."""
        name = self.metadata.get("subset_file")
        if not name:
            raise ValueError(
                f"{self.path / 'selection.json'}: a {self.format} export must name its records file in "
                "'subset_file'; re-run export_selection."
            )
        path = self.file(name)
        records = load_records(path)
        expected = self.selected_hashes()
        if expected is not None:
            if len(expected) != len(records):
                raise ValueError(
                    f"{path} holds {len(records)} records but {len(expected)} rows were selected; re-run "
                    "export_selection."
                )
            for row, (record, want) in enumerate(zip(records, expected, strict=True)):
                if record_hash(record) != want:
                    raise ValueError(
                        f"{path}: record {row} (pool row {self.indices[row]}) is not the record that was selected (it "
                        "was edited or the file replaced since the export); re-run export_selection with the pool."
                    )
        return records, path

    def selected_hashes(self) -> list[str] | None:
        """The ``record_hash`` of the selected rows in pool order, when the export's score table carries them."""
        import pyarrow.parquet as pq

        path = self.path / "scores.parquet"
        if not path.is_file() or RECORD_HASH_COLUMN not in pq.read_schema(path).names:
            return None
        table = pq.read_table(path, columns=["index", "selected", RECORD_HASH_COLUMN]).to_pydict()
        columns = zip(table["index"], table[RECORD_HASH_COLUMN], table["selected"], strict=True)
        chosen = sorted((i, h) for i, h, s in columns if s)
        return [h for _, h in chosen]

    def subset_pool(self) -> Pool:
        """The selected rows as a :class:`~icons_hf.pools.Pool` of the pool's format: the records file (checked
        as :meth:`subset_records` checks it) or the ``data/train-*.parquet`` shards as one ``datasets.Dataset``."""
        name = self.metadata["pool"].get("name", self.path.name)
        if is_records_format(self.format):
            records, path = self.subset_records()
            return Pool(name=name, format=self.format, path=str(path), records=records)
        from datasets import Dataset

        shards = [str(p) for p in self.subset_shards()]
        return Pool(name=name, format=self.format, path=str(self.path / "data"), dataset=Dataset.from_parquet(shards))

    def subset_shards(self) -> list[Path]:
        """The ``data/train-*.parquet`` shards of a datasets-pool export, in order."""
        shards = sorted((self.path / "data").glob("train-*.parquet"))
        if not shards:
            self.file("data/train-00000-of-00001.parquet")
        return shards

    def pool_path(self) -> str | None:
        """The pool recorded in selection.json when it is still reachable (as given, or relative to the export)."""
        path = self.metadata["pool"].get("path")
        if not path:
            return None
        for candidate in (path, os.path.join(self.path, path)):
            if os.path.exists(candidate):
                return candidate
        logger.info("The pool %s recorded in selection.json is not reachable.", path)
        return None


def read_export(folder: str | os.PathLike, *, need: Sequence[str] = ("README.md", "scores.parquet")) -> ExportFolder:
    """Read and check a folder written by :func:`export_selection` (selection.json, indices.json and ``need``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the output_dir written by icons_hf.export_selection.")
    export = ExportFolder(folder, {}, [])
    for name in ("selection.json", "indices.json", *need):
        export.file(name)
    with open(folder / "selection.json", encoding="utf-8") as handle:
        metadata = json.load(handle)
    pool = metadata.get("pool") if isinstance(metadata, dict) else None
    fmt = pool.get("format") if isinstance(pool, dict) else None
    if fmt not in POOL_FORMATS:
        raise ValueError(
            f"{folder / 'selection.json'}: pool.format is {fmt!r}, expected one of {', '.join(POOL_FORMATS)}; "
            "was the folder written by icons_hf.export_selection?"
        )
    with open(folder / "indices.json", encoding="utf-8") as handle:
        indices = json.load(handle)
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise ValueError(f"{folder / 'indices.json'}: expected a list of pool positions; re-run export_selection.")
    num_selected = metadata.get("num_selected", len(indices))
    if num_selected != len(indices):
        raise ValueError(
            f"{folder}: selection.json says {num_selected} rows were selected but indices.json lists {len(indices)}; "
            "re-run export_selection."
        )
    metadata["num_selected"] = num_selected
    return dataclasses.replace(export, metadata=metadata, indices=indices)
