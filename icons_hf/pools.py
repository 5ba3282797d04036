"""Pools as files and datasets: one place that reads them, names their format and fingerprints their rows.

A pool is given as

* a LLaVA-style ``.json`` file (a list of records) or ``.jsonl`` file (one record per line);
* a folder written by ``datasets.Dataset.save_to_disk``;
* a ``datasets.Dataset``.

:func:`record_hash` is the identity of one source record: a short BLAKE2b hash of the record's canonical JSON
(keys sorted, ``None`` values and integral floats normalised, so a record read from JSON and the same record
read back from a ``datasets.Dataset`` hash alike). ``icons_hf.data.prepare_llava_dataset`` and
``prepare_chat_dataset`` store it per row in a ``record_hash`` column; the gradient stores and the score table
carry it along, and :func:`icons_hf.export_selection` compares it with the pool it is given, so a pool that was
reordered, regenerated or edited since it was scored is refused instead of exported by position.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

RECORD_HASH_COLUMN = "record_hash"
# A tokenized pool without record_hash is identified by a hash of each row's model inputs instead.
INPUT_HASH_COLUMN = "input_hash"
# Columns of a dataset row that are never model inputs (and so never part of its input hash).
_NOT_INPUTS = ("index", RECORD_HASH_COLUMN, INPUT_HASH_COLUMN)
RECORD_EXTENSIONS = (".json", ".jsonl")
# Record pool formats are "<kind>_<json|jsonl>"; a datasets pool (object or save_to_disk folder) is "hf".
RECORD_KINDS = ("llava", "chat", "records")
POOL_FORMATS = ("hf", *(f"{kind}_{ext}" for kind in RECORD_KINDS for ext in ("json", "jsonl")))
_DETECT_ROWS = 1000
ROWS_PER_PARQUET = 100_000  # rows per data/train-*.parquet shard of a datasets pool's subset
_HASH_BATCH = 10_000
# Rows whose input values are hashed together: few enough that wide columns (pixel_values) stay small in memory.
_INPUT_HASH_ROWS = 64


# --------------------------------------------------------------------------------------------------- reading


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of a ``.json`` file (a list of objects) or a ``.jsonl`` file (one object per line), in file order.

    Every problem is an error naming the file and the line or row: a missing file, invalid JSON, a file that is
    not a list, a row that is not an object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pool file {path} does not exist; pass the path of a .json or .jsonl records file.")
    if not path.endswith(RECORD_EXTENSIONS):
        raise ValueError(f"pool file {path}: expected a .json (list of records) or .jsonl (one record per line) file.")
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


def write_records(records: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Write records as ``.jsonl`` (one per line) or ``.json`` (a list), chosen by the file's extension."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(list(records), handle, ensure_ascii=False)


def record_kind(records: Sequence[Mapping]) -> str:
    """``"llava"`` (``conversations``), ``"chat"`` (``messages``) or ``"records"``, from the first records."""
    head = records[:_DETECT_ROWS]
    if head and all("conversations" in r for r in head):
        return "llava"
    if head and all("messages" in r for r in head):
        return "chat"
    return "records"


def records_format(records: Sequence[Mapping], path: str | os.PathLike) -> str:
    """The pool format of a records file: ``<kind>_<json|jsonl>`` (see :data:`POOL_FORMATS`)."""
    ext = "jsonl" if os.fspath(path).endswith(".jsonl") else "json"
    return f"{record_kind(records)}_{ext}"


def is_records_format(fmt: str) -> bool:
    """Whether an export of this pool format holds a records file (rather than ``data/*.parquet``)."""
    return fmt in POOL_FORMATS and fmt != "hf"


@dataclass
class Pool:
    """A pool as given by the user, and everything that depends on its format: exactly one of ``dataset`` /
    ``records`` is set. It reads itself (:func:`load_pool`), hashes its rows, writes a subset in its own format
    (:meth:`write_subset`), says whether it holds images, groups its rows (:meth:`group_labels`) and becomes a
    ``datasets.Dataset`` with or without its images (:meth:`to_dataset`)."""

    name: str
    format: str
    path: str | None = None
    dataset: object = None
    records: list | None = None

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.records)

    def hashes(self) -> list[str]:
        """:func:`record_hash` of every row, in pool order (a dataset's own ``record_hash`` column when it has
        one: the tokenized pool that ``prepare_*`` returned)."""
        if self.records is not None:
            return [record_hash(r) for r in self.records]
        if RECORD_HASH_COLUMN in self.dataset.column_names:
            return column_values(self.dataset, RECORD_HASH_COLUMN)
        return dataset_record_hashes(self.dataset)

    def subset_file(self) -> str | None:
        """The name of the subset's records file (``<stem>_icons.json(l)``); ``None`` for a datasets pool, whose
        subset is written as ``data/train-*.parquet``."""
        if self.records is None:
            return None
        stem, ext = os.path.splitext(os.path.basename(self.path))
        return f"{stem}_icons{ext}"

    def write_subset(self, positions: Sequence[int], output_dir: str) -> None:
        """Writes the rows at ``positions`` in the pool's own format into ``output_dir``: the records, unchanged
        and in order, as :meth:`subset_file`; or a datasets pool's rows as ``data/train-*.parquet`` shards."""
        positions = [int(p) for p in positions]
        if self.records is not None:
            write_records([self.records[i] for i in positions], os.path.join(output_dir, self.subset_file()))
            return
        subset = self.dataset.select(positions)
        data_dir = os.path.join(output_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        shards = max(1, math.ceil(len(subset) / ROWS_PER_PARQUET))
        for k in range(shards):
            subset.shard(shards, k, contiguous=True).to_parquet(
                os.path.join(data_dir, f"train-{k:05d}-of-{shards:05d}.parquet")
            )

    def has_images(self) -> bool:
        """Whether rows carry images (an ``Image`` feature or ``pixel_values``; an ``image`` field in the first
        records)."""
        if self.dataset is not None:
            features = self.dataset.features.values()
            return any(type(f).__name__ == "Image" for f in features) or "pixel_values" in self.dataset.column_names
        return any("image" in r for r in self.records[:_DETECT_ROWS])

    def group_labels(self, field: str | None = None) -> tuple[list[str], str] | None:
        """One group label per row and the grouping's name: ``field``'s value (a record field or a column); without
        ``field``, a records pool's ``source`` field when every record has one, else LLaVA's image top folder
        (``coco``, ``gqa``, ...; ``text-only`` without image); ``None`` when no grouping applies."""
        where = self.path or self.name
        if self.dataset is not None:
            if field is None:
                return None
            if field not in self.dataset.column_names:
                raise ValueError(f"{where} has no column {field!r} (columns: {', '.join(self.dataset.column_names)}); "
                                 "pass another group_column=.")
            return [group_label(v) for v in column_values(self.dataset, field)], field
        return _record_groups(self.records, field, where)

    def to_dataset(self, *, image_folder: str | os.PathLike | None = None):
        """The pool as a ``datasets.Dataset``: a datasets pool as it is; records with the union of their fields
        (a record without a field gets ``None``), and with ``image_folder`` their ``image`` paths resolved under it
        and stored as a ``datasets.Image()`` column (each missing image is an error naming the row)."""
        from datasets import Dataset, Image

        if self.dataset is not None:
            return self.dataset
        records = self.records if image_folder is None else _resolve_images(self.records, image_folder, self.path)
        columns: dict[str, list] = {}
        for record in records:
            for key in record:
                columns.setdefault(key, [])
        for key, values in columns.items():
            values.extend(record.get(key) for record in records)
        dataset = Dataset.from_dict(columns)
        if image_folder is not None and "image" in dataset.column_names:
            dataset = dataset.cast_column("image", Image())
        return dataset


def group_label(value) -> str:
    """A group's label: a string as it is, lists and objects as sorted JSON, anything else ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _record_groups(records: Sequence[Mapping], field: str | None, where: str) -> tuple[list[str], str] | None:
    if field is not None:
        out = []
        for i, record in enumerate(records):
            if field not in record:
                raise ValueError(
                    f"{where}: record {i} has no {field!r} field; pass group_column= a field every record has, or "
                    "groups= a mapping from pool row to group."
                )
            out.append(group_label(record[field]))
        return out, field
    if records and all("source" in r for r in records):
        return [group_label(r["source"]) for r in records], "source"
    # LLaVA-665K: the image's top folder names the source (coco, gqa, ocr_vqa, textvqa, vg); no image = text-only.
    images = [r.get("image") for r in records]
    if any(isinstance(im, str) and "/" in im for im in images):
        labels = [
            im.split("/")[0] if isinstance(im, str) and "/" in im else ("text-only" if not im else "(no folder)")
            for im in images
        ]
        return labels, "image folder"
    return None


def _resolve_images(records: list[dict], image_folder: str | os.PathLike, source) -> list[dict]:
    root = os.fspath(image_folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image_folder {root} is not a folder; pass the root of the LLaVA images.")
    out = []
    for row, record in enumerate(records):
        rel = record.get("image")
        if rel is None:
            out.append(record)
            continue
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            raise FileNotFoundError(
                f"{source}: row {row} (id={record.get('id')!r}) refers to image {rel!r}, but {full} does not exist; "
                "pass image_folder= the folder the LLaVA image paths are relative to."
            )
        out.append({**record, "image": full})
    return out


def load_pool(pool, *, name: str | None = None) -> Pool:
    """A :class:`Pool` from a ``datasets.Dataset``, a ``save_to_disk`` folder or a ``.json``/``.jsonl`` file."""
    from datasets import Dataset, load_from_disk

    if isinstance(pool, Dataset):
        return Pool(name=name or "dataset", format="hf", dataset=pool)
    if not isinstance(pool, (str, os.PathLike)):
        raise TypeError(
            f"pool of type {type(pool).__name__} is not supported; pass a datasets.Dataset, a folder saved with "
            "Dataset.save_to_disk, or the path of a .json/.jsonl records file (a list of records: "
            "Dataset.from_list(records))."
        )
    path = os.fspath(pool)
    if os.path.isdir(path):
        try:
            dataset = load_from_disk(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"pool folder {path} is not a dataset saved with Dataset.save_to_disk; pass that folder, a Dataset or "
                "a .json/.jsonl records file."
            ) from None
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"pool folder {path} holds a DatasetDict; pass the folder of one split (e.g. {path}/train)."
            )
        return Pool(name=name or os.path.basename(os.path.normpath(path)), format="hf", path=path, dataset=dataset)
    if not path.endswith(RECORD_EXTENSIONS):
        if not os.path.exists(path):
            raise FileNotFoundError(f"pool {path} does not exist; pass a .json/.jsonl file or a save_to_disk folder.")
        raise ValueError(f"pool {path}: expected a .json/.jsonl records file, a saved dataset folder or a Dataset.")
    records = load_records(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return Pool(name=name or stem, format=records_format(records, path), path=path, records=records)


# --------------------------------------------------------------------------------------------------- identity


def _canonical(value, where: str):
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}[{k!r}]") for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _canonical(value.tolist(), where)
    if isinstance(value, np.generic):
        return _canonical(value.item(), where)
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return int(value) if value.is_integer() else value
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(
        f"{where} is a {type(value).__name__}, which cannot be hashed as JSON; pass records of JSON values "
        "(str, numbers, lists, objects) or the dataset's raw Arrow rows."
    )


def record_hash(record: Mapping) -> str:
    """Stable identity of a source record: 16 hex characters of BLAKE2b over its canonical JSON.

    Keys are sorted, ``None`` values dropped (a ``datasets`` row gains ``None`` for fields other rows have) and
    integral floats written as integers, so the same record read from a JSON file or from a ``datasets.Dataset``
    hashes alike; any change of a value changes the hash.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record_hash expects a record object (a mapping), got {type(record).__name__}.")
    text = json.dumps(_canonical(record, "record"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def dataset_record_hashes(dataset, columns: Sequence[str] | None = None) -> list[str]:
    """:func:`record_hash` of every row of a ``datasets.Dataset`` (its raw Arrow values: images are hashed by their
    stored bytes/paths, never decoded), in row order."""
    view = dataset.with_format("arrow")
    if columns is not None:
        view = view.select_columns(list(columns))
    out: list[str] = []
    for start in range(0, len(dataset), _HASH_BATCH):
        out += [record_hash(row) for row in view[start : start + _HASH_BATCH].to_pylist()]
    return out


def _numeric(arrow_type) -> bool:
    import pyarrow as pa

    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def input_columns(dataset) -> list[str]:
    """The columns an input hash covers: ``input_ids``, ``labels`` and every other numeric column (model inputs
    such as ``attention_mask`` or ``pixel_values``), sorted; text columns, ``index`` and the hash columns are not
    model inputs and are left out."""
    schema = dataset.with_format("arrow").features.arrow_schema
    return sorted(f.name for f in schema if f.name not in _NOT_INPUTS and _numeric(f.type))


def _leaf_values(array) -> tuple[list, object]:
    """``(per nesting level the list lengths, leaf values)`` of an Arrow array of (nested lists of) numbers, as
    int64 / float64 NumPy arrays (nulls as -1 lengths / 0 values with their mask): the same values stored as int32
    or int64, float32 or float64, give the same bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    levels = []
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        levels.append(pc.fill_null(pc.list_value_length(array), -1).to_numpy(zero_copy_only=False).astype(np.int64))
        array = pc.list_flatten(array)
    mask = array.is_null().to_numpy(zero_copy_only=False)
    kind = np.float64 if pa.types.is_floating(array.type) else np.int64
    values = pc.fill_null(array, 0).to_numpy(zero_copy_only=False).astype(kind)
    return levels, (values, mask)


def _column_row_bytes(name: str, array) -> list[bytes | None]:
    """Canonical bytes of each row of one numeric column (its name, list lengths at every level, leaf values);
    ``None`` for a row without a value, which hashes as if the column were absent (a text row of a pool whose
    image rows have ``pixel_values`` hashes alike in its own part and in the concatenated pool)."""
    absent = array.is_null().to_numpy(zero_copy_only=False)
    levels, (values, mask) = _leaf_values(array)
    n = len(array)
    starts, ends = np.arange(n), np.arange(1, n + 1)
    pieces = [[name.encode()] for _ in range(n)]
    for lengths in levels:
        bounds = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))])
        for r in range(n):
            pieces[r].append(lengths[starts[r]:ends[r]].tobytes())
        starts, ends = bounds[starts], bounds[ends]
    for r in range(n):
        pieces[r] += [values[starts[r]:ends[r]].tobytes(), np.packbits(mask[starts[r]:ends[r]]).tobytes()]
    return [None if absent[r] else b"\x00".join(p) for r, p in enumerate(pieces)]


def input_hashes(dataset, columns: Sequence[str], rows: Sequence[int] | None = None) -> list[str]:
    """Per row (of ``rows``, default all, in that order) a hash of its model inputs: 16 hex characters of BLAKE2b
    over the canonical bytes of its values in ``columns`` (see :func:`input_columns`; integers as int64, floats
    as float64, list lengths included). A row hashes alike wherever it sits, so a tokenized pool shuffled after
    scoring is found by comparing these hashes. A column of ``columns`` that ``dataset`` lacks is an error."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the pool lacks column {missing[0]!r}, which the scored rows' input_hash covers ({', '.join(columns)}); "
            "pass the tokenized pool with the columns it had when its gradients were computed."
        )
    view = dataset.with_format("arrow")
    positions = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.int64)
    out: list[str] = []
    for lo in range(0, len(positions), _INPUT_HASH_ROWS):
        table = view[positions[lo : lo + _INPUT_HASH_ROWS].tolist()]
        per_column = [_column_row_bytes(c, table.column(c).combine_chunks()) for c in sorted(columns)]
        rows_bytes = zip(*per_column, strict=True)
        out += [hashlib.blake2b(b"\x01".join(p for p in parts if p is not None), digest_size=8).hexdigest()
                for parts in rows_bytes]
    return out


def column_values(dataset, name: str) -> list:
    """One column of a ``datasets.Dataset`` as a Python list, in row order (read from Arrow in one piece: the
    row-by-row ``Column`` of ``dataset[name]`` is some 30x slower on large pools)."""
    return dataset.with_format("arrow", columns=[name])[:].column(name).to_pylist()


def iter_dataset_records(dataset) -> Iterable[dict]:
    """Rows of a ``datasets.Dataset`` as Python dicts of their raw (undecoded) values, in order."""
    view = dataset.with_format("arrow")
    for start in range(0, len(dataset), _HASH_BATCH):
        yield from view[start : start + _HASH_BATCH].to_pylist()


def check_row_identity(pool_hashes: Sequence[str], index: np.ndarray, table_hashes: Sequence, pool_name: str) -> None:
    """Refuse a pool whose rows are not the records the score table was computed on.

    ``index[i]`` is the pool row of score-table row ``i`` and ``table_hashes[i]`` the hash recorded for it when
    the features were computed. The message names the first mismatching pool row and the fix.
    """
    pool_hashes = np.asarray(pool_hashes, dtype=object)
    table_hashes = np.asarray(table_hashes, dtype=object)
    order = np.argsort(index, kind="stable")
    index, table_hashes = index[order], table_hashes[order]
    missing = np.flatnonzero(np.equal(table_hashes, None))
    if len(missing):
        raise ValueError(
            f"the score table's record_hash is empty for pool row {int(index[missing[0]])}; the table was edited or "
            "merged by hand. Recompute the influence from the gradient stores."
        )
    differ = np.flatnonzero(pool_hashes[index] != table_hashes)
    if not len(differ):
        return
    row = int(index[differ[0]])
    same_records = sorted(pool_hashes[index].tolist()) == sorted(table_hashes.tolist())
    why = (
        "it holds the scored records in another order (shuffled or re-sorted)" if same_records else
        f"{len(differ)} of the {len(index)} scored rows hold other records (regenerated, edited or another pool)"
    )
    raise ValueError(
        f"pool {pool_name!r} is not the pool the scores were computed on: row {row} holds record "
        f"{pool_hashes[row]} but the score table expects {table_hashes[differ[0]]}; {why}. Export with the exact "
        "pool file or dataset that was passed to the gradient stage, in its original order."
    )


__all__ = [
    "POOL_FORMATS",
    "INPUT_HASH_COLUMN",
    "RECORD_HASH_COLUMN",
    "Pool",
    "ROWS_PER_PARQUET",
    "check_row_identity",
    "column_values",
    "dataset_record_hashes",
    "group_label",
    "input_columns",
    "input_hashes",
    "is_records_format",
    "iter_dataset_records",
    "load_pool",
    "load_records",
    "record_hash",
    "record_kind",
    "records_format",
    "write_records",
]
