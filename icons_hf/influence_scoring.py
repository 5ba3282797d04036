"""Scoring the pool: the ``Dataset.map`` over the memory-mapped train stores and, for per-example specialists,
the column step over a temporary file of cosines.

The map function (:func:`score_batch`) reads a batch of checkpoint 0's rows and the same rows of the other
checkpoints' stores by position, multiplies each checkpoint's unit features by its validation matrix (float16
features are converted to float32 a slice at a time), sums the checkpoints with their weights and hands the
batch's pages back to the operating system (:func:`release_pages`), so memory does not grow with the pool.
Row-wise specialists write the task scores directly; per-example specialists write each batch's cosines into a
``4 x rows x V``-byte column-major file (each batch its own rows, so ``num_proc`` processes write disjoint
ranges) whose columns are then combined one at a time (:func:`combine_examples`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets

from .influence_plan import InfluencePlan, store_name
from .pools import INPUT_HASH_COLUMN, RECORD_HASH_COLUMN
from .ranks import TASK_PREFIX
from .specialists import SPECIALISTS
from .store import load_gradients, read_store_metadata

logger = logging.getLogger(__name__)

IDENTITY_COLUMNS = (RECORD_HASH_COLUMN, INPUT_HASH_COLUMN)  # per-row identity carried from the stores
_CHUNK_VALUES = 1 << 23  # float32 values converted at a time (32 MiB)


@dataclass(frozen=True)
class PoolDataset:
    """One checkpoint's pool as one memory-mapped ``Dataset`` (its parts concatenated), with each part's first
    position (``bounds``) and the pool-row offset of its ``index`` (``offsets``)."""

    data: Dataset
    bounds: np.ndarray
    offsets: np.ndarray
    name: str

    def pool_index(self, positions: np.ndarray, index: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.bounds, positions, side="right") - 1
        return index.astype(np.int64) + self.offsets[part]


def pool_dataset(parts: Sequence[str]) -> PoolDataset:
    stores = [load_gradients(p) for p in parts]
    sizes = [len(s) for s in stores]
    rows = [int(read_store_metadata(p)["num_rows"]) for p in parts]
    for column in IDENTITY_COLUMNS:
        hashes = [column in s.column_names for s in stores]
        if any(hashes) and not all(hashes):
            raise ValueError(f"{parts[hashes.index(False)]} has no {column} column while {parts[hashes.index(True)]} "
                             "has one; recompute the parts with the same version of the extraction.")
    data = concatenate_datasets(stores) if len(stores) > 1 else stores[0]
    return PoolDataset(data.with_format("arrow"), np.cumsum([0] + sizes[:-1]), np.cumsum([0] + rows[:-1]),
                       store_name(parts))


def _feature_block(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(index, rows x dim features, norms, whether the features are a zero-copy view of the table's own
    buffers)`` of an Arrow batch (a view when the batch lies in one shard)."""
    column = table.column("features")
    single = column.num_chunks == 1
    values = (column.chunks[0] if single else column.combine_chunks()).flatten()
    try:
        flat, view = values.to_numpy(zero_copy_only=True), single
    except pa.ArrowInvalid:
        flat, view = values.to_numpy(zero_copy_only=False), False
    return table.column("index").to_numpy(), flat.reshape(len(table), -1), table.column("norm").to_numpy(), view


@functools.lru_cache(maxsize=2)
def _scratch(rows: int, dim: int) -> np.ndarray:
    """One reused float32 buffer per process (fresh allocations cost page faults on every batch)."""
    return np.empty((rows, dim), dtype=np.float32)


def unit_products(features: np.ndarray, norms: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(features / norms) @ matrix`` in float32; float16 rows are converted a slice at a time into a reused
    float32 buffer (float16 has no fast matmul)."""
    out = np.empty((len(features), matrix.shape[1]), dtype=np.float32)
    if features.dtype == np.float32:
        np.matmul(features, matrix, out=out)
    else:
        chunk = max(1, _CHUNK_VALUES // max(1, features.shape[1]))
        buffer = _scratch(chunk, features.shape[1])
        for lo in range(0, len(features), chunk):
            block = features[lo : lo + chunk]
            np.copyto(buffer[: len(block)], block)
            np.matmul(buffer[: len(block)], matrix, out=out[lo : lo + len(block)])
    out /= norms[:, None]
    return out


def weighted_products(batch: pa.Table, positions: np.ndarray, pools: Sequence[PoolDataset],
                      matrices: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(pool row index, rows x columns float64 sum_c w_c products)`` of one batch of checkpoint 0's rows and the
    same positions of the other checkpoints' pools, whose row indices must agree."""
    lo, hi = int(positions[0]), int(positions[-1]) + 1
    total, index = None, None
    for c, pool in enumerate(pools):
        table = batch if c == 0 else pool.data[lo:hi]
        if c and len(table) != len(batch):
            raise ValueError(f"{pool.name} holds fewer rows than {pools[0].name}; compute them on the same pool.")
        raw_index, features, norms, view = _feature_block(table)
        rows = pool.pool_index(positions, raw_index)
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{pool.name}: row {int(rows[zero[0]])} has a zero gradient feature.")
        if index is None:
            index = rows
        elif not np.array_equal(rows, index):
            raise ValueError(
                f"{pool.name} and {pools[0].name} list different row indices; compute them on the same pool."
            )
        scores = unit_products(features, norms, matrices[c]).astype(np.float64)
        total = weights[c] * scores if total is None else total + weights[c] * scores
        if view and pool.data.cache_files:  # pages of the memory-mapped store file, not of a copy
            release_pages(features)
    return index, total


def score_batch(batch: pa.Table, positions, *, pools, matrices, weights, specialist: str, columns_of: dict,
                cosine_file: str | None, n_rows: int) -> pa.Table:
    """The ``Dataset.map`` function: one batch of pool rows -> ``index`` (+ ``record_hash``) and either the task
    scores (row-wise specialists) or nothing more, its per-example cosines written to ``cosine_file``."""
    positions = np.asarray(positions, dtype=np.int64)
    index, total = weighted_products(batch, positions, pools, matrices, weights)
    out = {"index": pa.array(index)}
    for column in IDENTITY_COLUMNS:
        if column in batch.column_names:
            out[column] = batch.column(column)
    if cosine_file is None:
        combine = SPECIALISTS[specialist].combine
        for task, cols in columns_of.items():
            out[f"{TASK_PREFIX}{task}"] = pa.array(combine(total[:, cols]).astype(np.float32))
    else:
        write_cosine_rows(cosine_file, n_rows, int(positions[0]), total.astype(np.float32))
    return pa.table(out)


def combine_examples(cosine_file: str, plan: InfluencePlan) -> dict[str, np.ndarray]:
    """Per task, its examples' cosine columns combined by the specialist (one column in memory at a time)."""
    combine = plan.specialist.combine
    out = {}
    for task, cols in plan.columns_of().items():
        columns = (read_cosine_column(cosine_file, plan.n_rows, j) for j in cols)
        out[task] = np.asarray(combine(columns, plan.n_rows)).astype(np.float32)
    return out


def create_cosine_file(folder: str, n_columns: int, n_rows: int) -> str:
    """An empty ``columns x rows`` float32 file (column-major) in ``folder``."""
    path = os.path.join(folder, "cosines.f32")
    with open(path, "wb") as handle:
        handle.truncate(4 * n_columns * n_rows)
    return path


def write_cosine_rows(path: str, n_rows: int, first_row: int, block: np.ndarray) -> None:
    """Writes ``block`` (``rows x columns`` float32, the rows from ``first_row`` on) into the column-major file."""
    columns = np.ascontiguousarray(block.T)
    fd = os.open(path, os.O_WRONLY)
    try:
        for j in range(columns.shape[0]):
            os.pwrite(fd, columns[j].tobytes(), 4 * (j * n_rows + first_row))
    finally:
        os.close(fd)


def read_cosine_column(path: str, n_rows: int, j: int) -> np.ndarray:
    """Column ``j`` (every pool row's cosine with validation example ``j``)."""
    return np.fromfile(path, dtype=np.float32, count=n_rows, offset=4 * j * n_rows)


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release_pages(block: np.ndarray) -> None:
    """Hands the pages under ``block``, a read-only view of a memory-mapped file, back to the operating system
    (Linux; elsewhere nothing): they are file pages, read again if touched, so resident memory stays at about
    one batch. Never call it on other memory (``MADV_DONTNEED`` zeroes anonymous pages)."""
    madvise = _madvise()
    if madvise is None or block.nbytes == 0 or block.flags.writeable:
        return
    start = block.__array_interface__["data"][0]
    end = start + block.nbytes
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the block only
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(first, last - first, mmap.MADV_DONTNEED)


def cosine_folder(work_dir, cache_file_name, nbytes: int) -> str:
    """Where the per-example cosine file goes (``work_dir``; else the cache file's folder; else the system's
    temporary folder), checked to exist and to have room for it."""
    if work_dir is not None:
        folder, what = os.fspath(work_dir), f"work_dir {os.fspath(work_dir)!r}"
    elif cache_file_name:
        folder = os.path.dirname(os.path.abspath(cache_file_name))
        what = f"the folder of cache_file_name ({folder})"
    else:
        folder, what = tempfile.gettempdir(), f"the temporary folder {tempfile.gettempdir()!r}"
    if not os.path.isdir(folder):
        raise ValueError(f"{what} does not exist; create it or pass work_dir= (--work-dir) an existing folder.")
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ValueError(
            f"the per-example specialist needs {nbytes / 2**30:.2f} GiB of temporary space for its cosines "
            f"(4 bytes x pool rows x validation examples) but {what} has {free / 2**30:.2f} GiB free; pass "
            "work_dir= (--work-dir) a folder with room, use fewer validation examples, or specialist='mean'."
        )
    return folder


__all__ = ["IDENTITY_COLUMNS", "PoolDataset", "combine_examples", "cosine_folder", "create_cosine_file", "pool_dataset",
           "read_cosine_column", "release_pages", "score_batch", "unit_products", "weighted_products",
           "write_cosine_rows"]
