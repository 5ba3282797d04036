"""Specialist variants and feature diagnostics, measured beside the paper's rule.

* :func:`balanced_influence`: *per-validation-example balanced* specialists. The paper's specialist
  (:func:`icons_hf.compute_influence`) scores a row by its mean cosine over the task's validation rows, which
  equals the cosine with one mean unit vector; the validation examples whose cosines spread widest over the pool
  (typically those of the answer class the model currently gets wrong) then decide the ranking, and the task's
  top rows drift toward one answer class. Both variants give every validation example the same say. With
  ``c_v(z) = sum_c w_c cos(g_z^c, g_v^c)`` (the paper's checkpoint weights) for validation example ``v``:

  - ``mode="quota"`` (default): ``I_k(z) = max_v q_v(z)`` with ``q_v`` the within-pool percentile rank of
    ``c_v``. A row is high when it is among the best rows of *some* example, so thresholding ``I_k`` keeps about
    the same number of rows per validation example (the union of their top lists), whatever its answer class.
  - ``mode="zscore"``: standardise each example's column over the pool,
    ``z_v(z) = (c_v(z) - mean_z c_v) / std_z c_v``, and average, ``I_k(z) = mean_v z_v(z)``. Every example
    contributes unit variance; the average still cancels what examples disagree on.

  Subtasks pool their validation examples.
* :func:`adam_feature_diagnostics`: how much of an Adam (LESS) train feature is the optimizer's shared momentum
  term rather than the row's own gradient, and how parallel the features of different rows are.

The coverage-aware consensus (a per-task floor before the votes fill the rest) is the ``task_floor`` argument of
:func:`icons_hf.select`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from .consensus import percentile_ranks
from .influence import _check_compatible, influence_provenance, resolve_inputs
from .store import load_gradients, read_store_metadata

logger = logging.getLogger(__name__)


def _unit_rows(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    store = load_gradients(path).with_format("numpy", columns=["index", "features", "norm"], dtype=np.float32)[:]
    norms = np.asarray(store["norm"], dtype=np.float32)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ValueError(f"{path}: {what} row {int(store['index'][zero[0]])} has a zero gradient feature; remove it.")
    return np.asarray(store["index"]), np.asarray(store["features"], dtype=np.float32) / norms[:, None]


BALANCE_MODES = ("quota", "zscore")


def balanced_influence(train, tasks: Mapping, *, mode: str = "quota", checkpoint_weights: Sequence[float] | None = None,
                       batch_size: int = 4096):
    """Per-validation-example balanced specialist scores (see the module docstring for ``mode``).

    Args and the returned table are those of :func:`icons_hf.compute_influence` (``index`` plus one float32
    ``influence_<task>`` column per task, in the train stores' row order), so :func:`icons_hf.select` and
    :func:`icons_hf.export_selection` take it unchanged. Memory: the pool's cosine with every validation
    example is held at once, ``4 * rows * validation_examples`` bytes per task.
    """
    from datasets import Dataset, Features, Value

    from .config import validate_choice

    validate_choice("mode", mode, BALANCE_MODES)
    train, tasks, metas, weights = resolve_inputs(train, tasks, checkpoint_weights)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")

    columns: dict[str, np.ndarray] = {}
    index = None
    for task, subs in tasks.items():
        cosines = None
        for c, train_path in enumerate(train):
            vals = []
            for paths in subs.values():
                _check_compatible(metas[c], read_store_metadata(paths[c]), train_path, paths[c])
                vals.append(_unit_rows(paths[c], "validation")[1])
            val = np.concatenate(vals, axis=0)
            rows = load_gradients(train_path).with_format("numpy", columns=["index", "features", "norm"], dtype=np.float32)
            if cosines is None:
                cosines = np.zeros((len(rows), len(val)), dtype=np.float64)
            elif cosines.shape != (len(rows), len(val)):
                raise ValueError(
                    f"{train_path} or the validation stores of task {task!r} hold other rows than at the first "
                    "checkpoint; compute every checkpoint on the same pool and validation sets."
                )
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                idx = np.asarray(batch["index"])
                if index is None or len(index) < len(rows):
                    index = idx if index is None or start == 0 else np.concatenate([index, idx])
                elif not np.array_equal(index[start : start + len(idx)], idx):
                    raise ValueError(f"{train_path} and {train[0]} list different row indices; compute them on the same pool.")
                norms = np.asarray(batch["norm"], dtype=np.float32)
                zero = np.flatnonzero(norms == 0)
                if len(zero):
                    raise ValueError(f"{train_path}: row {int(idx[zero[0]])} has a zero gradient feature.")
                unit = np.asarray(batch["features"], dtype=np.float32) / norms[:, None]
                cosines[start : start + len(idx)] += weights[c] * (unit @ val.T)
        if mode == "quota":
            ranks = np.stack([percentile_ranks(cosines[:, j]) for j in range(cosines.shape[1])], axis=1)
            columns[f"influence_{task}"] = ranks.max(axis=1).astype(np.float32)
        else:
            std = cosines.std(axis=0)
            std[std == 0] = 1.0
            columns[f"influence_{task}"] = ((cosines - cosines.mean(axis=0)) / std).mean(axis=1).astype(np.float32)

    features = Features({"index": Value("int64"), **{name: Value("float32") for name in columns}})
    scores = Dataset.from_dict({"index": index.astype(np.int64), **columns}, features=features)
    scores.info.description = json.dumps(
        {"influence": influence_provenance(train, tasks, weights, metas, specialist=f"balanced-{mode}")}
    )
    return scores


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
    import torch

    from .gradients import compute_gradients
    from .gradients.extractor import _resolve_state, _unwrap
    from .gradients.precondition import AdamState

    if len(dataset) < 2:
        raise ValueError("adam_feature_diagnostics needs at least two rows (it compares rows with each other).")
    base = _unwrap(model)
    state = _resolve_state(optimizer_state, base)
    zero_momentum = AdamState(
        {
            name: {"exp_avg": torch.zeros_like(st["exp_avg"]), "exp_avg_sq": st["exp_avg_sq"], "step": st.get("step", 0)}
            for name, st in state.moments.items()
        },
        betas=state.betas,
        eps=state.eps,
        source=f"{state.source} with exp_avg set to zero",
    )
    owned = work_dir is None
    root = tempfile.mkdtemp(prefix="icons_adam_diag_") if owned else os.fspath(work_dir)
    try:
        common = dict(projection="identity", dim=0, batch_size=batch_size, dtype="float32", pad_token_id=pad_token_id,
                      show_progress=False)
        paths = {
            "adam": compute_gradients(model, dataset, output_dir=os.path.join(root, "adam"), feature="adam",
                                      optimizer_state=state, adam_variant=adam_variant, **common),
            "gradient_term": compute_gradients(model, dataset, output_dir=os.path.join(root, "gradient_term"),
                                               feature="adam", optimizer_state=zero_momentum,
                                               adam_variant=adam_variant, **common),
            "sgd": compute_gradients(model, dataset, output_dir=os.path.join(root, "sgd"), feature="sgd", **common),
        }
        feats = {
            k: np.asarray(load_gradients(p).with_format("numpy", columns=["features"], dtype=np.float64)[:]["features"])
            for k, p in paths.items()
        }
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    full, momentum = feats["adam"], feats["adam"] - feats["gradient_term"]
    full_norm = np.linalg.norm(full, axis=1)
    mom_norm = np.linalg.norm(momentum, axis=1)
    safe = np.where(full_norm > 0, full_norm, 1.0)
    cos_mom = np.einsum("ij,ij->i", full, momentum) / (safe * np.where(mom_norm > 0, mom_norm, 1.0))
    return {
        "rows": int(len(full)),
        "adam_variant": adam_variant,
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
