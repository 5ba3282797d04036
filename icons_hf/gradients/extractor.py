"""``compute_gradients``: per-example gradient features of a dataset, written to a gradient store.

The defaults of every option are those of :class:`icons_hf.settings.FeatureSettings` (``preset=`` picks one of
its presets, ``settings=`` passes one); an option given explicitly overrides them. The resolved settings are
written whole into the store's ``store.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import is_main_process
from ..features import FEATURE_TYPES
from ..pools import input_columns, input_hashes
from ..settings import FeatureSettings, validate_choice
from ..store import StoreWriter
from .badrows import (
    NO_SUPERVISED,
    ON_BAD_ROW,
    BadRowError,
    BadRows,
    feature_problems,
    length_problem,
    loss_problem,
)
from .batching import extraction_checkpointing, fetch_rows, plan_batches, row_lengths
from .capture import LinearCapture
from .inputs import (
    ModelInputs,
    check_dataset,
    collate_rows,
    max_positions,
    model_device,
    unwrap_model,
)
from .loss import head_selection_supported, per_row_loss, supervised_losses
from .precondition import (
    Preconditioner,
    checkpoint_learning_rate,
    resolve_optimizer_state,
)
from .projection import Projector

logger = logging.getLogger(__name__)

RECORD_HASH = "record_hash"


def _fingerprint_tensors(named: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint_rows(dataset, columns=("input_ids", "labels")) -> str:
    """A content hash of ``columns`` of every row (stable across runs, unlike in-memory dataset fingerprints):
    by default the token ids and labels, which is what the store records as ``rows``."""
    table = dataset.with_format("arrow")
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(dataset), 4096):
        chunk = table[start : start + 4096]
        for column in columns:
            array = chunk.column(column).combine_chunks()
            for buffer in (array.flatten() if hasattr(array, "flatten") else array).buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


def record_hash_column(dataset) -> bool:
    """Whether ``dataset`` has a ``record_hash`` column (one string per row, a hash of its source record); it is
    then kept per row in the store. Any other type is refused by name."""
    if RECORD_HASH not in dataset.column_names:
        return False
    kind = dataset.features[RECORD_HASH]
    if getattr(kind, "dtype", None) not in ("string", "large_string"):
        raise TypeError(
            f"column {RECORD_HASH!r} holds {getattr(kind, 'dtype', kind)}; it must hold one string per row (a hash of "
            "the row's source record, as icons_hf.data writes it), or be removed."
        )
    nulls = dataset.with_format("arrow")[RECORD_HASH].null_count
    if nulls:
        raise ValueError(f"column {RECORD_HASH!r} is empty (None) in {nulls} row(s); give every row its hash.")
    return True


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


@dataclass
class _Setup:
    """What one extraction needs besides the dataset: the model's capture, the feature map and the projection."""

    model: nn.Module
    capture: LinearCapture
    precondition: Preconditioner
    projector: Projector
    device: torch.device
    config: dict
    learning_rate: float | None


def _setup(model: nn.Module, dataset, settings: FeatureSettings, feature: str, optimizer_state, learning_rate):
    validate_choice("feature", feature, FEATURE_TYPES)
    device = model_device(model)
    capture = LinearCapture(model, settings.parameters)
    state = None
    if FEATURE_TYPES[feature].needs_optimizer_state:
        if optimizer_state is None:
            raise ValueError(
                f"feature={feature!r} needs optimizer_state (a Trainer checkpoint folder, optimizer or mapping)."
            )
        state = resolve_optimizer_state(optimizer_state, model)
        state.check_covers(capture.shapes)
        if learning_rate is None and isinstance(optimizer_state, (str, os.PathLike)):
            learning_rate = checkpoint_learning_rate(optimizer_state)
    precondition = Preconditioner(feature, settings, state, device=device)
    shapes = {n: int(np.prod(s)) for n, s in capture.shapes.items()}
    projector = Projector(settings.projection, settings.dim, settings.seed, shapes, device=device)
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
        "rows": fingerprint_rows(dataset),
        "on_bad_row": settings.on_bad_row,
        "max_length": settings.max_length,
    }
    if settings.parameters != "trainable":  # stores of the default choice keep the layout they always had
        config["gradient_parameters"] = settings.parameters
    if record_hash_column(dataset):
        config["record_hashes"] = fingerprint_rows(dataset, (RECORD_HASH,))
    else:  # no source-record identity: each row is identified by its model inputs (checked again at export)
        config["input_hash_columns"] = input_columns(dataset)
    return _Setup(model, capture, precondition, projector, device, config, learning_rate)


class _Extraction:
    """Features of the rows of one dataset, shard by shard (see :func:`compute_gradients`)."""

    def __init__(self, setup: _Setup, dataset, settings: FeatureSettings):
        self.setup, self.dataset, self.settings = setup, dataset, settings
        self.limit = max_positions(setup.model)
        self.select_positions = head_selection_supported(setup.model, setup.capture)
        self.inputs = ModelInputs(setup.model)
        self.lengths = row_lengths(dataset)
        self.hashes = dataset.with_format("arrow")[RECORD_HASH] if "record_hashes" in setup.config else None
        self.input_columns = setup.config.get("input_hash_columns")

    def shard(self, start: int, end: int, progress) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(rows kept, their features, notes)`` of rows ``[start, end)``."""
        s = self.settings
        feats = np.zeros((end - start, self.setup.projector.dim), dtype=np.float32)
        keep = np.ones(end - start, dtype=bool)
        notes = {"skipped": [], "truncated": []}
        rows = np.arange(start, end)
        # Longest first, ties by position: batches of similar length waste little compute on padding.
        sizes = self.lengths[start:end] if s.max_length is None else np.minimum(self.lengths[start:end], s.max_length)
        for idx in plan_batches(rows, sizes, s.batch_size, s.max_tokens_per_batch):
            out, bad = self.batch(idx, notes)
            feats[idx - start] = out
            keep[[i - start for i in bad]] = False
            progress.update(len(idx))
        return rows[keep], feats[keep], notes

    def record_hashes(self, rows: np.ndarray):
        return None if self.hashes is None else self.hashes.take(rows.astype(np.int64)).to_pylist()

    def input_hashes(self, rows: np.ndarray):
        """The input hash of each of ``rows`` (``None`` when the dataset has a ``record_hash`` column)."""
        if self.input_columns is None:
            return None
        return input_hashes(self.dataset, self.input_columns, rows.astype(np.int64).tolist())

    def batch(self, idx: np.ndarray, notes: dict) -> tuple[np.ndarray, list[int]]:
        """Features of rows ``idx`` (zeros for bad rows) and the bad rows, recorded in ``notes``."""
        bad = BadRows(self.settings.on_bad_row)
        self._screen_lengths(idx, bad, notes)
        # Rows too long for the model or unreadable never reach the forward pass.
        batch = self._read(idx, bad)
        good = np.asarray([i for i in idx if i not in bad], dtype=np.asarray(idx).dtype)
        out = np.zeros((len(idx), self.setup.projector.dim), dtype=np.float32)
        if len(good):
            feats = self._features(good, batch, bad)
            out[np.isin(idx, good)] = feats
        return out, bad.record(notes)

    def _screen_lengths(self, idx, bad: BadRows, notes: dict) -> None:
        max_length = self.settings.max_length
        for i in idx:
            n = int(self.lengths[i])
            bad.add(i, length_problem(n, max_length, self.limit))
            if i not in bad and max_length is not None and n > max_length:
                notes["truncated"].append({"index": int(i), "from": n, "to": max_length})
        bad.check()

    def _read(self, idx, bad: BadRows) -> dict:
        """The readable rows of ``idx`` as model inputs; unreadable ones (e.g. an image a transform cannot open)
        are found by reading the rows one at a time once the batch read has failed."""
        wanted = [i for i in idx if i not in bad]
        if not wanted:
            return {}
        try:
            return fetch_rows(self.dataset, wanted)
        except (OSError, ValueError) as batch_error:
            readable = []
            for i in wanted:
                try:
                    fetch_rows(self.dataset, [i])
                except (OSError, ValueError) as err:
                    bad.error(i, f"cannot be read: {err}", err)
                else:
                    readable.append(i)
            if len(readable) == len(wanted):
                raise batch_error
            return fetch_rows(self.dataset, readable) if readable else {}

    def _features(self, idx: np.ndarray, rows: dict, bad: BadRows) -> np.ndarray:
        """Features of the readable rows ``idx`` (rows of ``rows``, in order); bad ones are noted in ``bad``."""
        setup, s = self.setup, self.settings
        batch = collate_rows(self.inputs.select(rows), s.pad_token_id, s.max_length)
        batch = {k: v.to(setup.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        supervised = (labels[:, 1:] != -100).sum(dim=1)
        for pos, i in enumerate(idx):
            bad.add(i, NO_SUPERVISED if int(supervised[pos]) == 0 else None)
        with torch.enable_grad(), setup.capture:
            losses, _ = supervised_losses(setup.model, batch, labels, self.select_positions)
            for pos, i in enumerate(idx):
                bad.add(i, loss_problem(float(losses[pos].detach())))
            bad.check()
            valid = torch.tensor([i not in bad for i in idx], device=losses.device)
            total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
            out = setup.projector.new_output(len(idx))
            # Each parameter's per-example gradients are preconditioned and projected as the backward pass reaches
            # its layer, so no more than one layer's per-example gradients exist at a time.
            setup.capture.backward(
                total, len(idx), lambda name, g: setup.projector.accumulate(out, name, setup.precondition(name, g))
            )
        out = out.cpu().numpy()
        # A finite loss can still give an overflowing gradient, and a zero feature has no direction: neither may be
        # stored as if it were a feature.
        for i, problem in zip(idx, feature_problems(out), strict=True):
            if i not in bad:
                bad.add(i, problem)
        bad.check()
        return out


@contextlib.contextmanager
def _extraction_mode(model: nn.Module):
    """Eval mode (dropout off, deterministic features) with gradient checkpointing kept on; restored after."""
    was_training = model.training
    model.eval()
    try:
        with extraction_checkpointing(model):
            yield
    finally:
        model.train(was_training)


def compute_gradients(
    model: nn.Module, dataset, *, output_dir: str | os.PathLike, feature: str | None = "sgd", optimizer_state=None,
    learning_rate: float | None = None, checkpoint: str | None = None, preset: str | None = None,
    settings: FeatureSettings | Mapping | None = None, show_progress: bool = True, **options,
) -> str:
    """Compute one gradient feature per row of ``dataset`` and write them to a gradient store; return its path.

    Args:
        model: a model whose trainable parameters are linear layers (e.g. a peft LoRA model), in any dtype
            (products are formed in float32). It runs in eval mode (dropout off: deterministic features) with its
            gradient checkpointing kept on (non-reentrant for the duration); its mode is restored afterwards.
        dataset: a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (-100 = not supervised, unshifted),
            optionally ``attention_mask``; further numeric columns the model's forward takes (``pixel_values``)
            are stacked and passed to it, other columns (``id``, an image path) are left out (logged once). A
            string column ``record_hash`` (a hash of each row's source record) is kept per row in the store;
            without one, ``input_hash`` (a hash of the row's model-input columns) is kept instead, so that an
            export of this dataset can check its rows are still the scored ones, in the scored order.
        output_dir: the store folder. The same call again resumes an interrupted run; a rerun with settings that
            change the features is refused, naming the setting. ``store.json`` records the settings whole.
        feature: this dataset's feature type (:mod:`icons_hf.features`): ``"sgd"`` (validation rows always) or
            ``"adam"`` (needs ``optimizer_state``); ``None``: the settings' ``train_feature``, the pool's feature
            (:func:`icons_hf.compute_checkpoint_stores` passes it for the pool).
        optimizer_state: a Trainer checkpoint folder (``optimizer.pt``), a live torch optimizer, or a mapping
            ``parameter name -> {"exp_avg", "exp_avg_sq"[, "step"]}``. Never modified.
        learning_rate: the checkpoint's learning rate (weights checkpoints in influence); read from the Trainer
            checkpoint's ``trainer_state.json`` when ``optimizer_state`` is a checkpoint folder.
        checkpoint: a name for the checkpoint (e.g. ``"checkpoint-500"``) stored in the metadata.
        preset: the ``FeatureSettings`` preset to start from (``"default"``, ``"paper"``).
        settings: a ``FeatureSettings`` (or a mapping of its fields) to start from instead of a preset.
        show_progress: show a progress bar on the main process.
        **options: any field of :class:`icons_hf.settings.FeatureSettings` (``parameters``, ``projection``, ``dim``,
            ``seed``, ``batch_size``, ``max_tokens_per_batch``, ``dtype``, ``on_bad_row``, ``max_length``,
            ``shard_size``, ``pad_token_id``, ``adam_variant``; their help says what each does), overriding the
            preset's or ``settings``' value when given (not ``None``); an unknown name is refused. Features never
            depend on ``batch_size``, ``max_tokens_per_batch`` or ``pad_token_id``.

    Under ``accelerate launch``/``torchrun``, call it in every process with the same arguments: one store results.
    """
    if "train_feature" in options:
        raise TypeError("compute_gradients takes feature= (this dataset's feature), not train_feature=.")
    settings = FeatureSettings.resolve(settings, preset, **options)
    check_dataset(dataset)
    model = unwrap_model(model)
    feature = settings.train_feature if feature is None else feature
    setup = _setup(model, dataset, settings, feature, optimizer_state, learning_rate)
    writer = StoreWriter(
        output_dir, config=setup.config, num_rows=len(dataset), shard_size=settings.shard_size,
        dim=setup.projector.dim, dtype=settings.dtype, record_hash="record_hashes" in setup.config,
        input_hash="input_hash_columns" in setup.config,
        extra={"learning_rate": setup.learning_rate, "checkpoint": checkpoint, "feature": feature,
               "settings": settings.to_dict()},
    )
    todo = writer.open()
    if todo:
        _write_shards(writer, _Extraction(setup, dataset, settings), todo, show_progress)
    path = writer.finalize()
    if is_main_process() and writer.skipped:
        logger.warning("%s: %d row(s) skipped as bad rows; their reasons are in store.json.", path, writer.skipped)
    return path


def _write_shards(writer: StoreWriter, extraction: _Extraction, todo: list, show_progress: bool) -> None:
    progress = tqdm(
        total=sum(e - s for s, e in todo),
        desc=f"gradients -> {os.path.join(*os.path.normpath(writer.path).split(os.sep)[-2:])}",
        unit="row",
        disable=not (show_progress and is_main_process()),
    )
    try:
        with _extraction_mode(extraction.setup.model):
            for start, end in todo:
                rows, feats, notes = extraction.shard(start, end, progress)
                writer.write_shard(start, end, rows, feats, notes, record_hash=extraction.record_hashes(rows),
                                   input_hash=extraction.input_hashes(rows))
    finally:
        progress.close()



__all__ = ["ON_BAD_ROW", "BadRowError", "collate_rows", "compute_gradients", "fingerprint_rows", "per_row_loss"]
