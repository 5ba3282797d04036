"""Batching for gradient extraction.

* Length buckets: rows are taken longest first and cut into batches of at most ``batch_size`` rows and, with a
  token budget, at most ``max_tokens_per_batch`` padded tokens (rows x longest row), so padding wastes little of
  the forward pass. Features never depend on how rows are batched.
* Collation of model inputs beside the tokens: stacked per example; rows with different numbers of images
  (Idefics3/SmolVLM, LLaVA-NeXT style ``pixel_values`` of shape ``(images, ...)``) are zero-padded along the first
  axis as those models' processors do; Qwen2-VL-style inputs, which have no per-example axis (``pixel_values``
  packs the patches of all images, ``image_grid_thw`` has one row per image), are concatenated.
* Gradient checkpointing: HF layers checkpoint only in training mode; during extraction they are kept
  checkpointing (non-reentrant) while the rest of the model, dropout included, is in eval mode.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

# Column groups that carry no per-example axis: present the key, concatenate the members along the first axis.
PACKED_COLUMNS = {
    "image_grid_thw": ("pixel_values", "image_grid_thw"),
    "video_grid_thw": ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
}


def row_lengths(dataset, max_length: int | None = None) -> np.ndarray:
    """Token count of every row (after truncation to ``max_length``), read from the Arrow column directly."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    lengths = np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.minimum(lengths, max_length) if max_length else lengths


def _is_list(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _column_values(array):
    """The rows of one Arrow column as NumPy: one array for the batch when every row has the same shape, else a
    list of per-row arrays. Float64 becomes float32, as ``torch.as_tensor`` would make of Python floats."""
    import pyarrow.compute as pc

    if array.null_count:
        return array.to_pylist()
    if not _is_list(array.type):
        values = array.to_numpy(zero_copy_only=False)
        if values.dtype == np.float64:
            values = values.astype(np.float32)
        return values if values.flags.writeable else values.copy()
    counts = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    inner = _column_values(array.flatten())
    if len(counts) and (counts == counts[0]).all() and isinstance(inner, np.ndarray):
        return inner.reshape(len(array), int(counts[0]), *inner.shape[1:])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [inner[bounds[i] : bounds[i + 1]] for i in range(len(array))]


_ARROW_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fetch_rows(dataset, indices) -> dict:
    """Rows ``indices`` of a ``datasets.Dataset`` as ``column -> values`` for :func:`collate_rows`.

    A dataset without a format or transform is read straight from Arrow into NumPy (no Python lists of numbers,
    which matters for image columns); otherwise ``dataset[indices]`` is used as is, transform included."""
    indices = [int(i) for i in indices]
    if dataset.format.get("type") is not None:
        return dataset[indices]
    view = _ARROW_VIEWS.get(dataset)
    if view is None:
        view = _ARROW_VIEWS[dataset] = dataset.with_format("arrow")
    table = view[indices]
    names = dataset.format.get("columns") or table.column_names
    return {name: _column_values(table.column(name).combine_chunks()) for name in names}


def plan_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int | None = None):
    """Cut ``rows`` (with their ``lengths``) into batches: longest first, ties by position; at most
    ``batch_size`` rows and, when ``max_tokens`` is set, at most ``max_tokens`` padded tokens per batch (a row
    longer than the budget makes a batch of its own)."""
    rows = np.asarray(rows)
    lengths = np.asarray(lengths)
    order = np.lexsort((rows, -lengths))
    batches, current, width = [], [], 0
    for pos in order:
        n = int(lengths[pos])
        if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * width > max_tokens)):
            batches.append(np.asarray(current))
            current = []
        if not current:
            width = n
        current.append(rows[pos])
    if current:
        batches.append(np.asarray(current))
    return batches


def stack_column(key: str, values: Sequence, packed: bool = False) -> torch.Tensor:
    """One model-input column of a batch (see the module docstring)."""
    present = [torch.as_tensor(v) for v in values if v is not None]
    if packed:
        if not present:
            raise ValueError(f"column {key!r} is empty for every row of the batch.")
        return torch.cat(present)
    if len(present) != len(values):
        raise ValueError(
            f"column {key!r} is missing (None) in some rows of the batch; give every row a value or drop the column."
        )
    shapes = {tuple(t.shape) for t in present}
    if len(shapes) == 1:
        return torch.stack(present)
    if len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes):
        longest = max(s[0] for s in shapes)
        out = present[0].new_zeros((len(present), longest, *present[0].shape[1:]))
        for i, t in enumerate(present):
            out[i, : t.shape[0]] = t
        return out
    raise ValueError(
        f"column {key!r} has rows of shapes {sorted(shapes)[:3]}; they can be batched only when they differ in the "
        "first axis (a number of images or patches). Resize the inputs to one shape in the image processor."
    )


def collate_extra(batch: Mapping[str, list], skip: Sequence[str]) -> dict:
    """The model inputs of ``batch`` other than the columns in ``skip``."""
    packed = {m for key, members in PACKED_COLUMNS.items() if key in batch for m in members}
    return {key: stack_column(key, values, key in packed) for key, values in batch.items() if key not in skip}


@contextlib.contextmanager
def extraction_checkpointing(model: nn.Module):
    """Keep gradient checkpointing on while extracting in eval mode, with the non-reentrant implementation.

    transformers' ``GradientCheckpointingLayer`` checkpoints only when the layer is in training mode. For the
    duration of the block each such layer with checkpointing enabled is marked as training (its submodules,
    dropout included, stay in eval mode) and, when it was set up with ``use_reentrant=True`` (or without the
    argument, which torch treats as reentrant), is switched to ``use_reentrant=False``: reentrant checkpointing
    runs the forward pass without autograd, so the layer outputs could not be captured. Both are restored after.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        yield
        return
    changed = []
    for module in model.modules():
        if not (isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        changed.append((module, module.training, func))
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant", True):
            module._gradient_checkpointing_func = functools.partial(
                func.func, *func.args, **{**func.keywords, "use_reentrant": False}
            )
        module.training = True
    try:
        yield
    finally:
        for module, training, func in changed:
            module.training = training
            module._gradient_checkpointing_func = func
