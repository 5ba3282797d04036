"""What goes into the model: checks of a dataset's columns, the columns the model takes, and their collation.

A dataset for feature extraction has ``input_ids`` and ``labels`` (-100 = not supervised, unshifted as HF models
take them), optionally ``attention_mask``, and any further model input (``pixel_values``, ``image_sizes``, ...).
Columns that are not model inputs (a row's ``id``, its ``record_hash``, the ``index`` a collator keeps, an
``image`` path) are left out of the model call: text columns always, other columns when the model's forward does
not name them. Each left-out column is logged once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from ..distributed import is_main_process
from .badrows import NO_SUPERVISED, BadRowError, length_problem
from .batching import collate_extra, fetch_rows
from .loss import base_model

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask")
REQUIRED_COLUMNS = ("input_ids", "labels")
# Kept by icons_hf.data's collator beside the model inputs; never a model input.
INDEX_COLUMN = "index"
_CHUNK_ROWS = 8192


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP / accelerate wrappers (``.module``); a peft model stays a peft model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def max_positions(model: nn.Module) -> int | None:
    """The model's position limit (``max_position_embeddings`` of its config or text config), if it has one."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int):
            return value
    return None


def _pad(rows: list, value, dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def collate_rows(batch: Mapping[str, list], pad_token_id: int = 0, max_length: int | None = None) -> dict:
    """Right-pad ``input_ids`` (``pad_token_id``), ``labels`` (-100) and ``attention_mask`` (0); stack the rest
    (zero-padding a differing first axis, concatenating Qwen2-VL-style packed inputs: see
    :func:`icons_hf.gradients.batching.stack_column`). Text columns and ``index`` are left out."""
    ids = [r[:max_length] if max_length else r for r in batch["input_ids"]]
    labels = [r[:max_length] if max_length else r for r in batch["labels"]]
    out = {"input_ids": _pad(ids, pad_token_id, torch.long), "labels": _pad(labels, -100, torch.long)}
    if "attention_mask" in batch:
        masks = [r[:max_length] if max_length else r for r in batch["attention_mask"]]
        out["attention_mask"] = _pad(masks, 0, torch.long)
    else:
        out["attention_mask"] = _pad([[1] * len(r) for r in ids], 0, torch.long)
    text = [key for key, values in batch.items() if key not in out and not is_numeric(values)]
    out.update(collate_extra(batch, skip=(*out, INDEX_COLUMN, *text)))
    return out


def is_numeric(values) -> bool:
    """Whether a column's values (a batch: list or array) are numbers a tensor can hold (not text, not None)."""
    if isinstance(values, torch.Tensor):
        return True
    first = next((v for v in values if v is not None), None) if not isinstance(values, np.ndarray) else values
    if first is None:
        return False
    if isinstance(first, torch.Tensor):
        return True
    try:
        kind = np.asarray(first).dtype.kind
    except (TypeError, ValueError):
        return False
    return kind in "biuf"


class ModelInputs:
    """The columns of a batch that go into ``model``'s forward.

    Token columns always go in. Any other column goes in when it is numeric and the forward names it (or, for a
    model outside transformers, takes ``**kwargs``); every other column is left out and logged once."""

    def __init__(self, model: nn.Module):
        base = base_model(unwrap_model(model))
        try:
            parameters = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        self.named = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        # transformers models take **kwargs for attention options, not for data columns.
        self.open = takes_kwargs and not type(base).__module__.startswith("transformers.")
        self.model_name = type(base).__name__
        self.left_out: dict[str, str] = {}

    def reason(self, key: str, values) -> str | None:
        """Why column ``key`` is left out of the model call, or ``None`` when it goes in."""
        if key in TOKEN_COLUMNS:
            return None
        if key == INDEX_COLUMN:
            return "the row index, not a model input"
        if not is_numeric(values):
            return "it does not hold numbers (text or empty)"
        if key in self.named or self.open:
            return None
        return f"{self.model_name}.forward does not take it"

    def select(self, batch: Mapping[str, list]) -> dict:
        """``batch`` without the columns that are not model inputs (each one logged the first time it is seen)."""
        out = {}
        for key, values in batch.items():
            why = self.reason(key, values)
            if why is None:
                out[key] = values
            elif key not in self.left_out:
                self.left_out[key] = why
                if is_main_process():
                    logger.info("Column %r is left out of the model inputs: %s.", key, why)
        return out


def _type_name(arrow_type) -> str:
    return str(arrow_type)


def check_dataset(dataset, name: str = "dataset") -> None:
    """Refuse, naming ``name`` and the column or row, a dataset that cannot give features: not a
    ``datasets.Dataset``, no rows, no ``input_ids``/``labels``, token columns that are not integer lists, or a row
    whose ``labels`` and ``input_ids`` differ in length."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        hint = "e.g. Dataset.from_list(rows)" if isinstance(dataset, (list, tuple)) else "e.g. Dataset.from_dict(...)"
        raise TypeError(f"{name} is a {type(dataset).__name__}; pass a datasets.Dataset, {hint}.")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {', '.join(missing)}; format the rows first (icons_hf.data) so that each has "
            "input_ids and labels (-100 where not supervised)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; there is nothing to compute features for.")
    _check_token_columns(dataset, name)


def _check_token_columns(dataset, name: str) -> None:
    table = dataset.with_format("arrow")
    present = [c for c in TOKEN_COLUMNS if c in dataset.column_names]
    for start in range(0, len(dataset), _CHUNK_ROWS):
        chunk = table[start : start + _CHUNK_ROWS]
        lengths = {}
        for column in present:
            array = chunk.column(column).combine_chunks()
            kind = array.type
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
                raise TypeError(
                    f"{name}: column {column!r} holds {_type_name(kind)}; it must hold a list of integer token ids per "
                    "row (tokenize the rows first, e.g. with icons_hf.data)."
                )
            if array.null_count:
                row = start + int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"{name}: row {row} has no {column!r} (None); give every row its tokens.")
            lengths[column] = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        for column in present[1:]:
            differ = np.flatnonzero(lengths[column] != lengths["input_ids"])
            if len(differ):
                row = start + int(differ[0])
                raise ValueError(
                    f"{name}: row {row} has {int(lengths[column][differ[0]])} {column} but "
                    f"{int(lengths['input_ids'][differ[0]])} input_ids; they must align token by token."
                )


def _supervised_counts(labels: pa.ListArray, max_length: int | None) -> np.ndarray:
    """Per row: labels other than -100 after the first position (and before ``max_length``), i.e. the tokens the
    next-token loss is taken on."""
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(len(values)) - np.repeat(starts[:-1], lengths)
    counted = (values != -100) & (position >= 1)
    if max_length is not None:
        counted &= position < max_length
    total = np.concatenate([[0], np.cumsum(counted)])
    return total[starts[1:]] - total[starts[:-1]]


def _row_problems(dataset, max_length: int | None, limit: int | None):
    """``(first row of the chunk, {row in chunk: problem})`` per chunk: the rows whose tokens show they cannot give
    a feature (no supervised token, or over the position ``limit``)."""
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), _CHUNK_ROWS):
        chunk = table[start : start + _CHUNK_ROWS]
        counts = _supervised_counts(chunk.column("labels").combine_chunks(), max_length)
        lengths = pc.list_value_length(chunk.column("input_ids").combine_chunks()).to_numpy(zero_copy_only=False)
        problems = {int(i): NO_SUPERVISED for i in np.flatnonzero(counts == 0)}
        for i in np.flatnonzero(lengths > (limit or np.inf)):
            problems.setdefault(int(i), length_problem(int(lengths[i]), max_length, limit))
        yield start, {i: p for i, p in problems.items() if p}


def count_bad_rows(dataset, *, max_length: int | None = None, limit: int | None = None) -> tuple[int, str | None]:
    """``(rows that on_bad_row='skip' would skip for what their tokens show, the first such row's problem)``."""
    total, first = 0, None
    for _, problems in _row_problems(dataset, max_length, limit):
        total += len(problems)
        if problems and first is None:
            first = problems[min(problems)]
    return total, first


def check_rows(dataset, name: str, *, max_length: int | None = None, limit: int | None = None) -> None:
    """Refuse, naming ``name`` and the row, a row that extraction with ``on_bad_row="error"`` would refuse and
    that can be seen from its tokens: no supervised token (after truncation to ``max_length``), or more tokens
    than the model's position ``limit``."""
    for start, problems in _row_problems(dataset, max_length, limit):
        if problems:
            first = min(problems)
            raise BadRowError(
                f"{name}: row {start + first}: {problems[first]}. Fix the row, or pass on_bad_row='skip' to record "
                "and skip it."
            )


def check_model_batch(model: nn.Module, dataset, name: str, *, pad_token_id: int = 0, rows: int = 2) -> list[str]:
    """Collate the first ``rows`` rows of ``dataset`` as extraction will and check every model input is one
    ``model``'s forward takes; return the columns left out. Errors name ``name`` and the column."""
    inputs = ModelInputs(model)
    try:
        batch = fetch_rows(dataset, range(min(rows, len(dataset))))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{name}: its first rows cannot be read ({err}); check the dataset's transform.") from err
    try:
        collate_rows(inputs.select(batch), pad_token_id)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"{name}: its first rows cannot be batched for {inputs.model_name} ({err}).") from err
    return sorted(inputs.left_out)


__all__ = [
    "ModelInputs",
    "check_dataset",
    "check_model_batch",
    "check_rows",
    "collate_rows",
    "count_bad_rows",
    "is_numeric",
    "max_positions",
    "model_device",
    "unwrap_model",
]
