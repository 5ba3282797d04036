"""Gradient stores: one folder per (checkpoint, split) holding per-example features.

Layout::

    <store>/store.json                       configuration, row count, completion, skipped rows
    <store>/shards/rows-<start>-<end>.arrow  Arrow stream files with columns index, features, norm

Rows are sharded by pool position in fixed ranges ``[start, end)``, so the shard a row lands in does not depend
on the number of processes, and concatenating the shards in name order gives the rows in pool order. A shard is
written to a temporary name and renamed into place, so a shard that exists is complete; a run that died is
resumed by computing the missing shards only. Rows skipped on request (``on_bad_row="skip"``) are listed with
their reason in the shard's schema metadata and, once the store is complete, in ``store.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from .distributed import barrier, process_info

logger = logging.getLogger(__name__)

STORE_FORMAT = "icons_hf.gradient_store"
STORE_VERSION = 1
_SHARD_RE = re.compile(r"^rows-(\d{10})-(\d{10})\.arrow$")
_NOTES_KEY = b"icons_hf.notes"


def _features_schema(dim: int, dtype: str) -> pa.Schema:
    from datasets import Features, List, Value

    features = Features(
        {"index": Value("int64"), "features": List(Value(dtype), length=dim), "norm": Value("float32")}
    )
    return features.arrow_schema


def _atomic_write_json(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_store_metadata(path: str | os.PathLike) -> dict:
    """The ``store.json`` of a gradient store, with a clear error when ``path`` is not one."""
    meta_path = os.path.join(os.fspath(path), "store.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{os.fspath(path)} is not a gradient store (no store.json); write one with compute_gradients or "
            "IconsCallback."
        )
    with open(meta_path) as handle:
        meta = json.load(handle)
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{meta_path} is not an icons_hf gradient store (format={meta.get('format')!r}).")
    return meta


def _config_differences(old: Mapping, new: Mapping) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key), sort_keys=True), json.dumps(new.get(key), sort_keys=True)
            if len(a) > 80:
                a = a[:77] + "..."
            if len(b) > 80:
                b = b[:77] + "..."
            diffs.append(f"{key}: stored {a}, requested {b}")
    return diffs


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(num_rows, start + shard_size)) for start in range(0, num_rows, shard_size)]


def _shard_name(start: int, end: int) -> str:
    return f"rows-{start:010d}-{end:010d}.arrow"


class StoreWriter:
    """Writes (or resumes) one gradient store. Every process of a distributed job creates one with the same
    arguments; each handles the shards ``shard_number % world_size == rank``."""

    def __init__(self, path, *, config: Mapping, num_rows: int, shard_size: int, dim: int, dtype: str, extra=None):
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
        self.schema = _features_schema(self.dim, dtype)

    def open(self) -> list[tuple[int, int]]:
        """Create or validate the store; return this process's shards that still need computing."""
        meta_path = os.path.join(self.path, "store.json")
        if self.rank == 0:
            os.makedirs(self.shard_dir, exist_ok=True)
            if os.path.isfile(meta_path):
                self._check_existing(read_store_metadata(self.path))
            else:
                _atomic_write_json(meta_path, self._metadata(complete=False, skipped=[]))
        barrier()
        if self.rank != 0:
            self._check_existing(read_store_metadata(self.path))
        done = set(self.existing_shards())
        ranges = shard_ranges(self.num_rows, self.shard_size)
        todo = [r for k, r in enumerate(ranges) if k % self.world == self.rank and r not in done]
        if done:
            logger.info("Resuming %s: %d of %d shards already written.", self.path, len(done), len(ranges))
        return todo

    def _check_existing(self, meta: Mapping) -> None:
        diffs = _config_differences(meta["config"], self.config)
        for key, value in (("num_rows", self.num_rows), ("shard_size", self.shard_size)):
            if meta.get(key) != value:
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
        self, start: int, end: int, indices: np.ndarray, features: np.ndarray, notes: Mapping[str, list] | None = None
    ) -> None:
        """Atomically write rows ``[start, end)`` (``indices`` ascending, features float32 ``n x dim``)."""
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
        table = pa.table(
            {
                "index": pa.array(np.asarray(indices, dtype=np.int64)),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), self.dim),
                "norm": pa.array(norms),
            },
            schema=schema,
        )
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
                raise RuntimeError(f"{self.path}: shards {missing[:3]} are missing after extraction; run again to finish them.")
            skipped, truncated = [], []
            for start, end in sorted(have):
                notes = _shard_notes(os.path.join(self.shard_dir, _shard_name(start, end)))
                skipped.extend(notes.get("skipped", []))
                truncated.extend(notes.get("truncated", []))
            self.extra.update(extra_updates or {})
            self.extra["truncated"] = truncated
            _atomic_write_json(os.path.join(self.path, "store.json"), self._metadata(complete=True, skipped=skipped))
        barrier()
        return self.path


def _shard_notes(path: str) -> dict:
    with pa.OSFile(path, "rb") as source:
        schema = pa.ipc.open_stream(source).schema
    return json.loads((schema.metadata or {}).get(_NOTES_KEY, b"{}"))


def load_gradients(path: str | os.PathLike):
    """Open a complete gradient store as a memory-mapped ``datasets.Dataset``.

    Columns: ``index`` (row position in the dataset the features were computed on), ``features`` (raw, not
    normalised, length ``dim``) and ``norm`` (float32 L2 norm of the feature before storage rounding). Rows are
    in ascending ``index`` order; skipped rows (see ``store.json``) are absent.
    """
    from datasets import Dataset, concatenate_datasets

    path = os.fspath(path)
    meta = read_store_metadata(path)
    if not meta.get("complete"):
        raise ValueError(
            f"{path} is incomplete (a run was interrupted); run the same compute_gradients call or command again "
            "to finish it."
        )
    shard_dir = os.path.join(path, "shards")
    names = sorted(n for n in os.listdir(shard_dir) if _SHARD_RE.match(n))
    parts = [Dataset.from_file(os.path.join(shard_dir, n)) for n in names]
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(dataset) != meta["num_features"]:
        raise ValueError(f"{path}: holds {len(dataset)} rows, store.json says {meta['num_features']}; the store is damaged.")
    dataset.info.description = json.dumps({"store": path})
    return dataset
