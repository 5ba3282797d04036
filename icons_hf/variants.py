"""Feature diagnostics, measured beside the paper's rule.

* :func:`adam_feature_diagnostics`: how much of an Adam (LESS) train feature is the optimizer's shared momentum
  term rather than the row's own gradient, and how parallel the features of different rows are.

The coverage-aware consensus (a per-task floor before the votes fill the rest) is the ``task_floor`` argument of
:func:`icons_hf.select`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np
import torch

from .gradients import compute_gradients, resolve_optimizer_state, unwrap_model
from .gradients.precondition import AdamState
from .store import load_gradients

logger = logging.getLogger(__name__)


def adam_feature_diagnostics(
    model,
    dataset,
    optimizer_state,
    *,
    adam_variant: str = "less",
    batch_size: int = 8,
    pad_token_id: int = 0,
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Split Adam train features into their momentum and gradient terms, exactly (no projection).

    With the checkpoint's moments ``m, v``, the LESS feature is ``(b1 m + (1 - b1) g) / sqrt(v' + eps)``; its
    *momentum term* ``b1 m / sqrt(v' + eps)`` is the same direction for every row up to the per-coordinate
    scale. The feature is computed twice with :func:`icons_hf.compute_gradients` (identity projection): with the
    real moments and with ``m`` set to zero; the difference is the momentum term (likewise for
    ``adam_variant="torch"``). Returned (all floats):

    * ``momentum_share``: mean over rows of ``|momentum term| / |feature|``;
    * ``momentum_cosine``: mean over rows of the cosine between the feature and its momentum term;
    * ``pairwise_cosine_adam`` / ``pairwise_cosine_sgd``: mean cosine between the features of two different
      rows, for the Adam feature and for the plain gradient (``0`` means unrelated, ``1`` all parallel);
    * ``rows``: how many rows were measured.

    Keep ``dataset`` small (a few hundred rows): features are stored at full size in ``work_dir`` (a temporary
    folder by default, removed afterwards). Under a multi-process launch, call it in every process with the same
    ``work_dir`` on a file system they share (the rows are split between processes); it is left in place.
    """
    if len(dataset) < 2:
        raise ValueError("adam_feature_diagnostics needs at least two rows (it compares rows with each other).")
    state = resolve_optimizer_state(optimizer_state, unwrap_model(model))
    feats = _diagnostic_features(model, dataset, state, adam_variant=adam_variant, batch_size=batch_size,
                                 pad_token_id=pad_token_id, work_dir=work_dir)
    return {"rows": int(len(feats["adam"])), "adam_variant": adam_variant, **_momentum_summary(feats)}


def _without_momentum(state: AdamState) -> AdamState:
    """The same optimizer state with ``exp_avg`` set to zero: its Adam feature is the gradient term alone."""
    return AdamState(
        {
            name: {
                "exp_avg": torch.zeros_like(st["exp_avg"]),
                "exp_avg_sq": st["exp_avg_sq"],
                "step": st.get("step", 0),
            }
            for name, st in state.moments.items()
        },
        betas=state.betas,
        eps=state.eps,
        source=f"{state.source} with exp_avg set to zero",
    )


def _diagnostic_features(model, dataset, state: AdamState, *, adam_variant: str, batch_size: int, pad_token_id: int,
                         work_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """Full-size float64 features ``adam`` (real moments), ``gradient_term`` (``m = 0``) and ``sgd``, one row each.

    They are written under ``work_dir``; without one, under a temporary folder removed afterwards."""
    owned = work_dir is None
    root = tempfile.mkdtemp(prefix="icons_adam_diag_") if owned else os.fspath(work_dir)
    try:
        common = dict(projection="identity", dim=0, batch_size=batch_size, dtype="float32", pad_token_id=pad_token_id,
                      show_progress=False)
        paths = {
            "adam": compute_gradients(model, dataset, output_dir=os.path.join(root, "adam"), feature="adam",
                                      optimizer_state=state, adam_variant=adam_variant, **common),
            "gradient_term": compute_gradients(model, dataset, output_dir=os.path.join(root, "gradient_term"),
                                               feature="adam", optimizer_state=_without_momentum(state),
                                               adam_variant=adam_variant, **common),
            "sgd": compute_gradients(model, dataset, output_dir=os.path.join(root, "sgd"), feature="sgd", **common),
        }
        return {
            k: np.asarray(load_gradients(p).with_format("numpy", columns=["features"], dtype=np.float64)[:]["features"])
            for k, p in paths.items()
        }
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def _momentum_summary(feats: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The float entries of :func:`adam_feature_diagnostics` from the features of :func:`_diagnostic_features`."""
    full, momentum = feats["adam"], feats["adam"] - feats["gradient_term"]
    full_norm = np.linalg.norm(full, axis=1)
    mom_norm = np.linalg.norm(momentum, axis=1)
    safe = np.where(full_norm > 0, full_norm, 1.0)
    cos_mom = np.einsum("ij,ij->i", full, momentum) / (safe * np.where(mom_norm > 0, mom_norm, 1.0))
    return {
        "momentum_share": float(np.mean(mom_norm / safe)),
        "momentum_cosine": float(np.mean(cos_mom)),
        "pairwise_cosine_adam": _mean_pairwise_cosine(full),
        "pairwise_cosine_sgd": _mean_pairwise_cosine(feats["sgd"]),
    }


def _mean_pairwise_cosine(features: np.ndarray) -> float:
    norms = np.linalg.norm(features, axis=1)
    unit = features / np.where(norms > 0, norms, 1.0)[:, None]
    gram = unit @ unit.T
    n = len(unit)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def pairwise_cosine(path: str | os.PathLike, rows: int = 512, seed: int = 0) -> float:
    """Mean cosine between the features of two different rows of a gradient store (a random sample of rows)."""
    store = load_gradients(path)
    take = np.sort(np.random.default_rng(seed).choice(len(store), min(rows, len(store)), replace=False))
    feats = np.asarray(store.with_format("numpy", columns=["features"], dtype=np.float64)[take]["features"])
    if len(feats) < 2:
        raise ValueError(f"{os.fspath(path)} holds fewer than two rows; a pairwise cosine needs two.")
    return _mean_pairwise_cosine(feats)
