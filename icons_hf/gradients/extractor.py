"""``compute_gradients``: per-example gradient features of a dataset, written to a gradient store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import is_main_process
from ..store import StoreWriter
from .batching import (
    collate_extra,
    extraction_checkpointing,
    fetch_rows,
    head_selection_supported,
    plan_batches,
    row_lengths,
    supervised_losses,
)
from .capture import LinearCapture
from .precondition import AdamState, Preconditioner, checkpoint_learning_rate
from .projection import Projector

logger = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
_SPECIAL_COLUMNS = ("input_ids", "labels", "attention_mask")


class BadRowError(ValueError):
    """A pool row that cannot give a gradient feature (named by its index)."""


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int):
            return value
    return None


def _fingerprint_tensors(named: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fingerprint_rows(dataset) -> str:
    """A content hash of the token ids and labels (stable across runs, unlike in-memory dataset fingerprints)."""
    table = dataset.with_format("arrow")
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(dataset), 4096):
        chunk = table[start : start + 4096]
        for column in ("input_ids", "labels"):
            for buffer in chunk.column(column).combine_chunks().flatten().buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


def _resolve_state(optimizer_state, model) -> AdamState:
    if isinstance(optimizer_state, AdamState):
        return optimizer_state
    if isinstance(optimizer_state, (str, os.PathLike)):
        return AdamState.from_checkpoint(optimizer_state, model)
    if isinstance(optimizer_state, torch.optim.Optimizer) or hasattr(optimizer_state, "param_groups"):
        return AdamState.from_optimizer(optimizer_state, model)
    if isinstance(optimizer_state, Mapping):
        return AdamState(optimizer_state)
    raise TypeError(
        f"optimizer_state of type {type(optimizer_state).__name__} is not supported; pass a Trainer checkpoint "
        "folder, a torch optimizer, or a mapping name -> {'exp_avg', 'exp_avg_sq'}."
    )


def _pad(rows: list, value, dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def collate_rows(batch: Mapping[str, list], pad_token_id: int = 0, max_length: int | None = None) -> dict:
    """Right-pad ``input_ids`` (``pad_token_id``), ``labels`` (-100) and ``attention_mask`` (0); stack the rest
    (zero-padding a differing first axis, concatenating Qwen2-VL-style packed inputs: see
    :func:`icons_hf.gradients.batching.stack_column`)."""
    ids = [r[:max_length] if max_length else r for r in batch["input_ids"]]
    labels = [r[:max_length] if max_length else r for r in batch["labels"]]
    out = {"input_ids": _pad(ids, pad_token_id, torch.long), "labels": _pad(labels, -100, torch.long)}
    if "attention_mask" in batch:
        masks = [r[:max_length] if max_length else r for r in batch["attention_mask"]]
        out["attention_mask"] = _pad(masks, 0, torch.long)
    else:
        out["attention_mask"] = _pad([[1] * len(r) for r in ids], 0, torch.long)
    out.update(collate_extra(batch, skip=(*out, "index")))
    return out


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over each row's supervised tokens (as a batch of one would compute it),
    and the number of supervised tokens per row."""
    shift_logits = logits[:, :-1].to(torch.float32)
    shift_labels = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def compute_gradients(
    model: nn.Module,
    dataset,
    *,
    output_dir: str | os.PathLike,
    feature: str = "sgd",
    optimizer_state=None,
    adam_variant: str = "less",
    projection: str = "countsketch",
    dim: int = 8192,
    seed: int = 0,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    dtype: str = "float16",
    on_bad_row: str = "error",
    max_length: int | None = None,
    learning_rate: float | None = None,
    checkpoint: str | None = None,
    shard_size: int = 4096,
    pad_token_id: int = 0,
    show_progress: bool = True,
) -> str:
    """Compute one gradient feature per row of ``dataset`` and write them to a gradient store.

    Args:
        model: a model with trainable parameters in linear layers (e.g. a peft LoRA model), in any dtype
            (products and features are formed in float32). It runs in eval mode, so LoRA and attention dropout
            are off and features are deterministic; its training mode is restored afterwards. Gradient
            checkpointing set up with ``gradient_checkpointing_enable`` stays on during extraction (switched to
            the non-reentrant implementation for the duration, see
            :func:`icons_hf.gradients.batching.extraction_checkpointing`).
        dataset: a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (-100 = not supervised, unshifted as
            HF models take them), optionally ``attention_mask``; every further column (e.g. ``pixel_values``)
            is stacked and passed to the model's forward.
        output_dir: the store folder. Calling again with the same arguments resumes an interrupted run;
            different settings are refused.
        feature: ``"sgd"`` (the gradient) or ``"adam"`` (Adam-preconditioned, needs ``optimizer_state``).
        optimizer_state: a Trainer checkpoint folder (``optimizer.pt``), a live torch optimizer, or a mapping
            ``parameter name -> {"exp_avg", "exp_avg_sq"[, "step"]}``. Never modified.
        adam_variant: ``"less"`` (default; ``m'/sqrt(v'+eps)``) or ``"torch"`` (bias-corrected AdamW update).
        projection: ``"countsketch"`` (default), ``"rademacher"`` or ``"identity"``.
        dim: projected dimension.
        seed: projection seed.
        batch_size: rows per forward/backward; features do not depend on it. Rows are batched longest first
            within each shard, so rows of similar length share a batch and little compute goes to padding.
        max_tokens_per_batch: optional budget of padded tokens per batch (rows x longest row); batches of long
            rows then hold fewer rows. Bounds activation memory; features do not depend on it.
        dtype: storage dtype of features, ``"float16"`` (default) or ``"float32"``; norms are kept in float32.
        on_bad_row: ``"error"`` (default) raises on a row with no supervised token, a non-finite loss or a
            length over the model's limit; ``"skip"`` leaves it out and records it with its reason.
        max_length: truncate longer rows to this many tokens (recorded in the store). Without it, a row longer
            than the model's position limit is a bad row.
        learning_rate: the checkpoint's learning rate (weights checkpoints in influence); read from the Trainer
            checkpoint's ``trainer_state.json`` when ``optimizer_state`` is a checkpoint folder.
        checkpoint: a name for the checkpoint (e.g. ``"checkpoint-500"``) stored in the metadata.
        shard_size: rows per shard file (the unit of resumption and of work split between processes).
        pad_token_id: id used to pad ``input_ids`` (its value never matters: padding is masked).
        show_progress: show a progress bar on the main process.

    Returns:
        The store path. Under ``accelerate launch``/``torchrun``, call it in every process with the same
        arguments: rows are split by shard between the processes and the result is one store.
    """
    from ..config import validate_choice

    validate_choice("on_bad_row", on_bad_row, ON_BAD_ROW)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} must be a positive number of tokens or None.")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens.")
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset lacks column(s) {', '.join(missing)}; format the rows first (icons_hf.data) so that each has "
            "input_ids and labels (-100 where not supervised)."
        )
    if len(dataset) == 0:
        raise ValueError("dataset is empty; there is nothing to compute features for.")
    model = _unwrap(model)
    device = _model_device(model)
    capture = LinearCapture(model)
    state = None
    if feature == "adam":
        if optimizer_state is None:
            raise ValueError("feature='adam' needs optimizer_state (a Trainer checkpoint folder, optimizer or mapping).")
        state = _resolve_state(optimizer_state, model)
        state.check_covers(capture.shapes)
        if learning_rate is None and isinstance(optimizer_state, (str, os.PathLike)):
            learning_rate = checkpoint_learning_rate(optimizer_state)
    precondition = Preconditioner(feature, adam_variant, state, device=device)
    shapes = {n: int(np.prod(s)) for n, s in capture.shapes.items()}
    projector = Projector(projection, dim, seed, shapes, device=device)
    named = dict(model.named_parameters())
    config = {
        "model_class": type(model).__name__,
        "model_config": hashlib.blake2b(_config_json(model).encode(), digest_size=16).hexdigest(),
        "weights": _fingerprint_tensors({n: named[n] for n in capture.parameter_names}),
        "parameters": {n: list(s) for n, s in capture.shapes.items()},
        "projection": projector.describe(),
        "preconditioner": precondition.describe(),
        "optimizer_state": None if state is None else _fingerprint_tensors(
            {f"{n}/{k}": state.moments[n][k] for n in capture.parameter_names for k in ("exp_avg", "exp_avg_sq")}
        ),
        "rows": _fingerprint_rows(dataset),
        "on_bad_row": on_bad_row,
        "max_length": max_length,
    }
    writer = StoreWriter(
        output_dir,
        config=config,
        num_rows=len(dataset),
        shard_size=shard_size,
        dim=projector.dim,
        dtype=dtype,
        extra={"learning_rate": learning_rate, "checkpoint": checkpoint},
    )
    todo = writer.open()
    limit = _max_positions(model)
    lengths = row_lengths(dataset) if todo else None
    select_positions = head_selection_supported(model, capture)

    was_training = model.training
    model.eval()
    progress = tqdm(
        total=sum(e - s for s, e in todo),
        desc=f"gradients -> {os.path.basename(os.fspath(output_dir))}",
        unit="row",
        disable=not (show_progress and is_main_process()),
    )
    restore = contextlib.ExitStack()
    restore.enter_context(extraction_checkpointing(model))
    try:
        for start, end in todo:
            feats = np.zeros((end - start, projector.dim), dtype=np.float32)
            keep = np.ones(end - start, dtype=bool)
            notes = {"skipped": [], "truncated": []}
            rows = np.arange(start, end)
            # Longest first, ties by position: batches of similar length waste little compute on padding.
            sizes = lengths[start:end] if max_length is None else np.minimum(lengths[start:end], max_length)
            for idx in plan_batches(rows, sizes, batch_size, max_tokens_per_batch):
                out, bad = _batch_features(
                    model, dataset, idx, capture, precondition, projector, device,
                    pad_token_id=pad_token_id, max_length=max_length, limit=limit, lengths=lengths,
                    on_bad_row=on_bad_row, notes=notes, select_positions=select_positions,
                )
                feats[idx - start] = out
                keep[[i - start for i in bad]] = False
                progress.update(len(idx))
            writer.write_shard(start, end, rows[keep], feats[keep], notes)
    finally:
        progress.close()
        restore.close()
        model.train(was_training)
    return writer.finalize()


# Config entries that switch runtime behaviour only (the Trainer turns use_cache off while training, for one); they
# must not make the same model look like another one.
_RUNTIME_CONFIG_KEYS = frozenset(
    {"use_cache", "_name_or_path", "transformers_version", "return_dict", "output_hidden_states", "output_attentions",
     "torchscript", "architectures"}
)


def _without_runtime_keys(value):
    if isinstance(value, dict):
        return {k: _without_runtime_keys(v) for k, v in value.items() if k not in _RUNTIME_CONFIG_KEYS}
    return value


def _config_json(model) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    try:
        payload = json.loads(config.to_json_string(use_diff=False))
    except TypeError:
        return json.dumps(str(config))
    return json.dumps(_without_runtime_keys(payload), sort_keys=True)


def _batch_features(model, dataset, idx, capture, precondition, projector, device, *, pad_token_id, max_length,
                    limit, lengths, on_bad_row, notes, select_positions=False):
    bad: dict[int, str] = {}
    for i in idx:
        n = int(lengths[i])
        kept = n if max_length is None else min(n, max_length)
        if limit is not None and kept > limit:
            bad[int(i)] = (f"{kept} tokens{' after truncation' if kept < n else ''} exceed the model's limit of "
                           f"{limit}; pass max_length <= {limit} to truncate")
        elif kept < n:
            notes["truncated"].append({"index": int(i), "from": n, "to": kept})
    if bad and on_bad_row == "error":
        first = min(bad)
        raise BadRowError(f"row {first}: {bad[first]}. Fix the row, or pass on_bad_row='skip' to record and skip it.")
    # Rows too long for the model or unreadable never reach the forward pass.
    idx_all = idx
    rows, unreadable = _fetch_readable(dataset, [i for i in idx if int(i) not in bad], on_bad_row)
    bad.update(unreadable)
    idx = np.asarray([i for i in idx if int(i) not in bad], dtype=np.asarray(idx_all).dtype)
    if len(idx) == 0:
        _record_skips(bad, notes)
        return np.zeros((len(idx_all), projector.dim), dtype=np.float32), sorted(bad)
    batch = {k: v.to(device) for k, v in collate_rows(rows, pad_token_id, max_length).items()}
    labels = batch.pop("labels")
    supervised = (labels[:, 1:] != -100).sum(dim=1)
    for pos, i in enumerate(idx):
        if int(supervised[pos]) == 0 and int(i) not in bad:
            bad[int(i)] = "no supervised tokens (every label after the first is -100), so its gradient is zero"
    with torch.enable_grad(), capture:
        losses, _ = supervised_losses(model, batch, labels, select_positions)
        finite = torch.isfinite(losses)
        for pos, i in enumerate(idx):
            if not bool(finite[pos]) and int(i) not in bad:
                bad[int(i)] = f"non-finite loss ({float(losses[pos].detach())})"
        if bad and on_bad_row == "error":
            first = min(bad)
            raise BadRowError(f"row {first}: {bad[first]}. Fix the row, or pass on_bad_row='skip' to record and skip it.")
        valid = torch.tensor([int(i) not in bad for i in idx], device=losses.device)
        total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
        out = projector.new_output(len(idx))
        # Each parameter's per-example gradients are preconditioned and projected as the backward pass reaches
        # its layer, so no more than one layer's per-example gradients exist at a time.
        capture.backward(total, len(idx), lambda name, grads: projector.accumulate(out, name, precondition(name, grads)))
    out = out.cpu().numpy()
    # A finite loss can still give an overflowing gradient, and a zero feature has no direction: neither may be
    # stored as if it were a feature.
    finite, nonzero = np.isfinite(out).all(axis=1), (out != 0).any(axis=1)
    for pos, i in enumerate(idx):
        if int(i) not in bad and not (finite[pos] and nonzero[pos]):
            bad[int(i)] = "its gradient feature is not finite" if not finite[pos] else "its gradient feature is exactly zero"
            if on_bad_row == "error":
                raise BadRowError(f"row {int(i)}: {bad[int(i)]}. Fix the row, or pass on_bad_row='skip' to record and skip it.")
    _record_skips(bad, notes)
    if len(idx) == len(idx_all):
        return out, sorted(bad)
    full = np.zeros((len(idx_all), out.shape[1]), dtype=out.dtype)
    full[np.isin(idx_all, idx)] = out
    return full, sorted(bad)


def _record_skips(bad: Mapping[int, str], notes: dict) -> None:
    for i, reason in sorted(bad.items()):
        notes["skipped"].append({"index": i, "reason": reason})
        logger.warning("Skipping row %d: %s", i, reason)


def _fetch_readable(dataset, idx, on_bad_row: str) -> tuple[dict, dict[int, str]]:
    """The batch's rows, and ``row -> reason`` for rows that cannot be read (e.g. an unreadable image in a
    transform), found by reading the rows one at a time once the batch read has failed."""
    if not len(idx):
        return {}, {}
    try:
        return fetch_rows(dataset, idx), {}
    except (OSError, ValueError) as batch_error:
        unreadable, readable = {}, []
        for i in idx:
            try:
                fetch_rows(dataset, [i])
            except (OSError, ValueError) as err:
                if on_bad_row == "error":
                    raise BadRowError(
                        f"row {int(i)} cannot be read: {err} (or pass on_bad_row='skip' to record and skip it)"
                    ) from err
                unreadable[int(i)] = f"cannot be read: {err}"
            else:
                readable.append(i)
        if not unreadable:
            raise batch_error
        return (fetch_rows(dataset, readable) if readable else {}), unreadable
