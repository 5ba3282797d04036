"""The score table's cache: where it is written and the record that lets an unchanged rerun load it.

The table goes to ``cache-<fingerprint>.arrow`` beside checkpoint 0's first train store shard (``datasets``'
convention for ``map`` results), or to ``cache_file_name``; beside it, ``<file>.icons.json`` records the
fingerprint (:attr:`icons_hf.influence_plan.InfluencePlan.fingerprint`), the table's files and its provenance.
A record of other inputs is ignored and the table recomputed and replaced.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import pyarrow as pa
from datasets import Dataset, concatenate_datasets, is_caching_enabled
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import get_temporary_cache_files_directory

from .provenance import Provenance

logger = logging.getLogger(__name__)


def write_table(table: pa.Table, path: str) -> Dataset:
    """Writes ``table`` as an Arrow stream file at ``path`` (atomically) and opens it memory-mapped."""
    partial = f"{path}.partial-{os.getpid()}"
    writer = ArrowWriter(path=partial, schema=table.schema)
    for batch in table.to_batches(max_chunksize=1 << 16):
        writer.write_table(pa.Table.from_batches([batch], schema=table.schema))
    writer.finalize()
    os.replace(partial, path)
    return Dataset.from_file(path)


def result_path(fingerprint: str, first_store: str, cache_file_name) -> str | None:
    """Where the score table goes: ``cache_file_name``; else ``cache-<fingerprint>.arrow`` beside the shards of
    ``first_store``, checkpoint 0's first train store (``datasets``' own place for ``map`` results), when caching
    is enabled and that folder is writable; else ``datasets``' temporary cache folder."""
    if cache_file_name is not None:
        return os.path.abspath(os.fspath(cache_file_name))
    name = f"cache-{fingerprint}.arrow"
    if is_caching_enabled():
        folder = os.path.join(first_store, "shards")
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
        logger.info("%s is not writable; the score table goes to datasets' temporary cache folder", folder)
    return os.path.join(get_temporary_cache_files_directory(), name)


def _sidecar(path: str) -> str:
    return f"{path}.icons.json"


def write_sidecar(path: str, payload: Mapping) -> None:
    partial = f"{_sidecar(path)}.partial-{os.getpid()}"
    with open(partial, "w") as handle:
        json.dump(payload, handle)
    os.replace(partial, _sidecar(path))


def load_cached(path: str, fingerprint: str):
    """The score table at ``path`` when its record says it was computed from the same inputs, else ``None``."""
    try:
        with open(_sidecar(path)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or not record.get("files"):
        return None
    if not all(os.path.isfile(f) for f in record["files"]):
        return None
    parts = [Dataset.from_file(f) for f in record["files"]]
    table = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return Provenance.from_dict(record["provenance"]).attach(table)


__all__ = ["load_cached", "result_path", "write_sidecar", "write_table"]
