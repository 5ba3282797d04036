"""Gradient stores: one folder per (checkpoint, split) holding per-example features.

Layout::

    <store>/store.json                       configuration, row count, completion, skipped rows
    <store>/shards/rows-<start>-<end>.arrow  Arrow stream files with columns index, features, norm
                                             (and record_hash when the dataset had that column,
                                             else input_hash: a hash of the row's model inputs)

Rows are sharded by pool position in fixed ranges ``[start, end)``, so the shard a row lands in does not depend
on the number of processes, and concatenating the shards in name order gives the rows in pool order. A shard is
written to a temporary name and renamed into place, so a shard that exists is complete; a run that died is
resumed by computing the missing shards only. Rows skipped on request (``on_bad_row="skip"``) are listed with
their reason in the shard's schema metadata and, once the store is complete, in ``store.json``.

A finished store is read either as one memory-mapped ``datasets.Dataset`` (:func:`load_gradients`) or as a
stream of NumPy batches whose pages are released as it goes (:func:`iter_store_batches`, what influence uses), so
reading a store of any size needs about one batch of memory.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from .distributed import barrier, process_info

logger = logging.getLogger(__name__)

STORE_FORMAT = "icons_hf.gradient_store"
STORE_VERSION = 1
_SHARD_RE = re.compile(r"^rows-(\d{10})-(\d{10})\.arrow$")
_NOTES_KEY = b"icons_hf.notes"


def _features_schema(dim: int, dtype: str, record_hash: bool = False, input_hash: bool = False) -> pa.Schema:
    from datasets import Features, List, Value

    columns = {"index": Value("int64"), "features": List(Value(dtype), length=dim), "norm": Value("float32")}
    if record_hash:
        columns["record_hash"] = Value("string")
    if input_hash:
        columns["input_hash"] = Value("string")
    return Features(columns).arrow_schema


def store_path(value, argument: str = "path") -> str:
    """The folder of a gradient store given as a path, or as the ``Dataset`` that :func:`load_gradients` returned
    (it remembers its folder). Anything else is refused, naming ``argument`` and what to pass."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    info = getattr(getattr(value, "info", None), "description", None)
    if info:
        try:
            folder = json.loads(info).get("store")
        except (ValueError, AttributeError):
            folder = None
        if isinstance(folder, str):
            return folder
    raise TypeError(
        f"{argument} is a {type(value).__name__}; pass the folder of a gradient store (the path compute_gradients "
        "returned), or the Dataset that load_gradients returned for it."
    )


def _atomic_write_json(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_store_metadata(path: str | os.PathLike) -> dict:
    """The ``store.json`` of a gradient store, with a clear error when ``path`` is not one."""
    path = store_path(path)
    meta_path = os.path.join(path, "store.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path} is not a gradient store (no store.json); write one with compute_gradients or "
            "IconsCallback."
        )
    with open(meta_path) as handle:
        meta = json.load(handle)
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{meta_path} is not an icons_hf gradient store (format={meta.get('format')!r}).")
    return meta


_SETTING_NAMES = {
    "weights": "model weights",
    "model_config": "model configuration",
    "model_class": "model class",
    "parameters": "trainable parameters",
    "optimizer_state": "optimizer state",
    "rows": "dataset rows",
    "projection": "projection",
    "preconditioner": "feature",
}


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """One line per differing setting, descending into nested settings so the line names the exact key."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "parameters":
            diffs.extend(_config_differences(a, b, prefix=f"{name}."))
            continue
        label = _SETTING_NAMES.get(name)
        diffs.append(f"{name}{f' ({label})' if label else ''}: stored {_short(a)}, requested {_short(b)}")
    return diffs


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(num_rows, start + shard_size)) for start in range(0, num_rows, shard_size)]


def _shard_name(start: int, end: int) -> str:
    return f"rows-{start:010d}-{end:010d}.arrow"


class StoreWriter:
    """Writes (or resumes) one gradient store. Every process of a distributed job creates one with the same
    arguments; each handles the shards ``shard_number % world_size == rank``."""

    def __init__(self, path, *, config: Mapping, num_rows: int, shard_size: int, dim: int, dtype: str, extra=None,
                 record_hash: bool = False, input_hash: bool = False):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype={dtype!r} is not supported; choose 'float16' (default) or 'float32'.")
        self.path = os.fspath(path)
        self.config = dict(config)
        self.num_rows = int(num_rows)
        self.shard_size = int(shard_size)
        self.dim = int(dim)
        self.dtype = dtype
        self.extra = dict(extra or {})
        self.rank, self.world = process_info()
        self.shard_dir = os.path.join(self.path, "shards")
        self.record_hash = bool(record_hash)
        self.input_hash = bool(input_hash)
        if self.record_hash and self.input_hash:
            raise ValueError("a store keeps either record_hash or input_hash per row, not both.")
        self.schema = _features_schema(self.dim, dtype, self.record_hash, self.input_hash)
        self.skipped = 0

    def open(self) -> list[tuple[int, int]]:
        """Create or validate the store; return this process's shards that still need computing."""
        meta_path = os.path.join(self.path, "store.json")
        if self.rank == 0:
            os.makedirs(self.shard_dir, exist_ok=True)
            if os.path.isfile(meta_path):
                self._check_existing(read_store_metadata(self.path))
            else:
                _atomic_write_json(meta_path, self._metadata(complete=False, skipped=[]))
            self._remove_partial_shards()
        barrier()
        if self.rank != 0:
            self._check_existing(read_store_metadata(self.path))
        done = set(self.existing_shards())
        ranges = shard_ranges(self.num_rows, self.shard_size)
        todo = [r for k, r in enumerate(ranges) if k % self.world == self.rank and r not in done]
        if done:
            logger.info("Resuming %s: %d of %d shards already written.", self.path, len(done), len(ranges))
        logger.info("Process %d of %d: %d shard(s) to compute in %s.", self.rank, self.world, len(todo), self.path)
        logger.debug("Process %d shards: %s", self.rank, " ".join(_shard_name(s, e) for s, e in todo))
        return todo

    def _remove_partial_shards(self) -> None:
        # Left by a process that died while writing; every process waits at the barrier after this, so none of
        # this job's own writes can be in progress.
        for name in sorted(os.listdir(self.shard_dir)):
            if ".arrow.tmp-" in name:
                logger.warning("Removing %s, a shard a previous run did not finish writing.", name)
                os.remove(os.path.join(self.shard_dir, name))

    def _check_existing(self, meta: Mapping) -> None:
        diffs = _config_differences(meta["config"], self.config)
        for key, value in (("num_rows", self.num_rows), ("shard_size", self.shard_size), ("dim", self.dim),
                           ("dtype", self.dtype), ("record_hash", self.record_hash), ("input_hash", self.input_hash)):
            if meta.get(key, False if key in ("record_hash", "input_hash") else None) != value:
                diffs.append(f"{key}: stored {meta.get(key)}, requested {value}")
        if diffs:
            raise ValueError(
                f"{self.path} already holds a gradient store written with other settings ("
                + "; ".join(diffs)
                + "). Use another output_dir, or delete the folder to start over."
            )

    def _metadata(self, *, complete: bool, skipped: list) -> dict:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "config": self.config,
            "num_rows": self.num_rows,
            "shard_size": self.shard_size,
            "dim": self.dim,
            "dtype": self.dtype,
            "complete": complete,
            "num_features": self.num_rows - len(skipped),
            "skipped": skipped,
            "bytes_per_row": self.dim * (2 if self.dtype == "float16" else 4) + 12,
            "record_hash": self.record_hash,
            "input_hash": self.input_hash,
            **self.extra,
        }

    def existing_shards(self) -> list[tuple[int, int]]:
        if not os.path.isdir(self.shard_dir):
            return []
        found = []
        for name in os.listdir(self.shard_dir):
            match = _SHARD_RE.match(name)
            if match:
                found.append((int(match.group(1)), int(match.group(2))))
        return sorted(found)

    def write_shard(
        self, start: int, end: int, indices: np.ndarray, features: np.ndarray, notes: Mapping[str, list] | None = None,
        record_hash=None, input_hash=None,
    ) -> None:
        """Atomically write rows ``[start, end)`` (``indices`` ascending, features float32 ``n x dim``, and with a
        store of ``record_hash=True`` / ``input_hash=True`` one hash string per row)."""
        for name, keeps, given in (("record_hash", self.record_hash, record_hash),
                                   ("input_hash", self.input_hash, input_hash)):
            if keeps != (given is not None):
                raise ValueError(
                    f"{self.path}: this store {'keeps' if keeps else 'has no'} {name} per row; "
                    f"write_shard got {'none' if given is None else 'some'}."
                )
        features = np.asarray(features, dtype=np.float32).reshape(len(indices), self.dim)
        norms = np.linalg.norm(features.astype(np.float64), axis=1).astype(np.float32)
        stored = features.astype(self.dtype)
        if not np.all(np.isfinite(stored)):
            bad = int(indices[np.flatnonzero(~np.isfinite(stored).all(axis=1))[0]])
            raise ValueError(
                f"row {bad}: its feature does not fit {self.dtype} (overflow or non-finite values); "
                "use dtype='float32'."
            )
        schema = self.schema.with_metadata({**self.schema.metadata, _NOTES_KEY: json.dumps(dict(notes or {})).encode()})
        columns = {
            "index": pa.array(np.asarray(indices, dtype=np.int64)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), self.dim),
            "norm": pa.array(norms),
        }
        if self.record_hash:
            if len(record_hash) != len(indices):
                raise ValueError(f"{self.path}: {len(record_hash)} record hashes for {len(indices)} rows.")
            columns["record_hash"] = pa.array(list(record_hash), type=pa.string())
        if self.input_hash:
            if len(input_hash) != len(indices):
                raise ValueError(f"{self.path}: {len(input_hash)} input hashes for {len(indices)} rows.")
            columns["input_hash"] = pa.array(list(input_hash), type=pa.string())
        table = pa.table(columns, schema=schema)
        final = os.path.join(self.shard_dir, _shard_name(start, end))
        tmp = f"{final}.tmp-{os.getpid()}"
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)

    def finalize(self, extra_updates: Mapping | None = None) -> str:
        """Wait for all processes, check every shard is present, and mark the store complete."""
        barrier()
        if self.rank == 0:
            have = set(self.existing_shards())
            missing = [r for r in shard_ranges(self.num_rows, self.shard_size) if r not in have]
            if missing:
                raise RuntimeError(
                    f"{self.path}: shards {missing[:3]} are missing after extraction; run again to finish them."
                )
            skipped, truncated = [], []
            for start, end in sorted(have):
                notes = _shard_notes(os.path.join(self.shard_dir, _shard_name(start, end)))
                skipped.extend(notes.get("skipped", []))
                truncated.extend(notes.get("truncated", []))
            self.extra.update(extra_updates or {})
            self.extra["truncated"] = truncated
            self.skipped = len(skipped)
            _atomic_write_json(os.path.join(self.path, "store.json"), self._metadata(complete=True, skipped=skipped))
        barrier()
        return self.path


def _shard_notes(path: str) -> dict:
    with pa.OSFile(path, "rb") as source:
        schema = pa.ipc.open_stream(source).schema
    return json.loads((schema.metadata or {}).get(_NOTES_KEY, b"{}"))


def _complete_shards(path: str) -> tuple[dict, list[str]]:
    meta = read_store_metadata(path)
    if not meta.get("complete"):
        raise ValueError(
            f"{path} is incomplete (a run was interrupted); run the same compute_gradients call or command again "
            "to finish it."
        )
    shard_dir = os.path.join(path, "shards")
    names = sorted(n for n in os.listdir(shard_dir) if _SHARD_RE.match(n))
    return meta, [os.path.join(shard_dir, n) for n in names]


def iter_store_batches(
    path: str | os.PathLike, batch_size: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a complete store as ``(index, features, norm)`` NumPy arrays of at most ``batch_size`` rows, in row order.

    Each shard file is memory-mapped and read without copying: ``features`` is a read-only ``rows x dim`` view in
    the stored dtype (``index`` and ``norm`` are small copies). Once the next batch is requested, the pages of the
    previous one are handed back to the operating system, so this process's resident memory stays at about one
    batch whatever the size of the store (the view stays valid: its pages are read again if it is touched).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    path = store_path(path)
    meta, files = _complete_shards(path)
    dim, dtype = int(meta["dim"]), np.dtype(meta["dtype"])
    seen = 0
    for file in files:
        for index, features, norm in _iter_shard(file, dim, dtype, batch_size):
            seen += len(index)
            yield index, features, norm
    if seen != meta["num_features"]:
        raise ValueError(f"{path}: holds {seen} rows, store.json says {meta['num_features']}; the store is damaged.")


def _iter_shard(file: str, dim: int, dtype: np.dtype, batch_size: int):
    with open(file, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ValueError(f"{file} is empty; the store is damaged (delete that shard and run the extraction again).")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    buffer = pa.py_buffer(mapped)
    try:
        reader = pa.ipc.open_stream(buffer)
        batches = list(reader)  # record batch headers only: the data stays in the mapped file
    except pa.ArrowInvalid as err:
        raise ValueError(f"{file} is not a readable shard ({err}); delete it and run the extraction again.") from err
    want = pa.list_(pa.from_numpy_dtype(dtype), dim)
    if reader.schema.field("features").type != want:
        raise ValueError(f"{file}: features are {reader.schema.field('features').type}, store.json says {want}.")
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        index = batch.column("index").to_numpy()
        norm = batch.column("norm").to_numpy()
        features = batch.column("features").flatten().to_numpy(zero_copy_only=True).reshape(n, dim)
        for lo in range(0, n, batch_size):
            block = features[lo : lo + batch_size]
            yield index[lo : lo + batch_size].copy(), block, norm[lo : lo + batch_size].copy()
            _release_pages(mapped, buffer.address, block)


def _release_pages(mapped: mmap.mmap, base: int, block: np.ndarray) -> None:
    if not hasattr(mapped, "madvise") or block.nbytes == 0:
        return
    start = block.__array_interface__["data"][0] - base
    end = start + block.nbytes
    start -= start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_record_hashes(path) -> dict[int, str] | None:
    """``row index -> record_hash`` of a complete store whose dataset had a ``record_hash`` column (``None`` for a
    store without one). Skipped rows are absent."""
    path = store_path(path)
    meta, files = _complete_shards(path)
    if not meta.get("record_hash"):
        return None
    out: dict[int, str] = {}
    for file in files:
        with pa.memory_map(file, "r") as source:  # zero-copy: the features are never read
            table = pa.ipc.open_stream(source).read_all().select(["index", "record_hash"])
        out.update(zip(table.column("index").to_pylist(), table.column("record_hash").to_pylist(), strict=True))
    return out


def load_gradients(path: str | os.PathLike):
    """Open a complete gradient store as a memory-mapped ``datasets.Dataset``.

    Columns: ``index`` (row position in the dataset the features were computed on), ``features`` (raw, not
    normalised, length ``dim``), ``norm`` (float32 L2 norm of the feature before storage rounding) and, when the
    dataset had one (``store.json``: ``"record_hash": true``), ``record_hash`` (the row's source-record hash), or
    else, in stores written since it exists (``"input_hash": true``), ``input_hash`` (a hash of the row's model
    inputs, :func:`icons_hf.pools.input_hashes`).
    Rows are in ascending ``index`` order; skipped rows (see ``store.json``) are absent. ``path`` may also be a
    Dataset this function returned.
    """
    from datasets import Dataset, concatenate_datasets

    path = store_path(path)
    meta, files = _complete_shards(path)
    parts = [Dataset.from_file(f) for f in files]
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(dataset) != meta["num_features"]:
        raise ValueError(
            f"{path}: holds {len(dataset)} rows, store.json says {meta['num_features']}; the store is damaged."
        )
    dataset.info.description = json.dumps({"store": path})
    return dataset
