"""The loss a gradient feature is taken of.

Each row's loss is its mean next-token cross-entropy over its own supervised tokens, as a batch of one computes
it, so a row's feature does not depend on its neighbours in the batch. When the model allows it (a transformers
model whose forward takes a boolean ``logits_to_keep`` mask and has no trainable layer in or after its head), the
language-model head runs on the supervised positions only, which saves the head's compute and memory on the
prompt tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (``get_base_model()``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


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


def head_selection_supported(model: nn.Module, capture) -> bool:
    """Whether the loss may run the language-model head on supervised positions only: a transformers model whose
    forward takes a boolean ``logits_to_keep`` mask, with no trainable layer in or after the head (the head then
    sees flattened positions, not one row per example)."""
    base = base_model(model)
    if not type(base).__module__.startswith("transformers."):
        return False
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    if "logits_to_keep" not in parameters:
        return False
    from transformers import modeling_utils

    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    if slicer is None or tuple(slicer(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape) != (1, 1):
        return False
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return False
    inside = {id(m) for m in head.modules()}
    return not any(id(site.module) in inside for site in capture.sites)


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def supervised_losses(model: nn.Module, batch: Mapping, labels: torch.Tensor, select_positions: bool):
    """Each row's mean next-token cross-entropy over its supervised tokens (float32), and their counts.

    ``labels`` are unshifted (-100 = not supervised), as HF models take them. With ``select_positions`` the head
    runs on the supervised positions only (``logits_to_keep`` mask); otherwise on every position."""
    if not select_positions:
        return per_row_loss(_logits(model(**batch, use_cache=False)), labels)
    shift = labels[:, 1:] != -100
    counts = shift.sum(dim=1)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shift
    logits = _logits(model(**batch, use_cache=False, logits_to_keep=keep))
    total = int(counts.sum())
    if logits.dim() != 2 or logits.shape[0] != total:
        raise RuntimeError(
            f"{type(base_model(model)).__name__} returned logits of shape {tuple(logits.shape)} for a logits_to_keep "
            f"mask of {total} positions; its head does not follow the transformers convention."
        )
    targets = labels[:, 1:][shift]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shift)[shift]
    token_loss = nn.functional.cross_entropy(logits.to(torch.float32), targets, reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_loss.device).index_add(0, rows, token_loss)
    return sums / counts.clamp(min=1), counts


__all__ = ["base_model", "head_selection_supported", "per_row_loss", "supervised_losses"]
