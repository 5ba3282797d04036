"""``IconsCallback``: gradient features at every checkpoint of a warmup ``transformers.Trainer`` run."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from .checkpoints import (
    RUN_FILE,
    check_bad_rows,
    check_inputs,
    check_model_inputs,
    compute_checkpoint_stores,
    load_run,
    run_stores,
)
from .features import FEATURE_TYPES
from .gradients.precondition import AdamState
from .settings import FeatureSettings

logger = logging.getLogger(__name__)


class IconsCallback(TrainerCallback):
    """Computes ICONS gradient features whenever the Trainer saves a checkpoint.

    At each save it runs :func:`icons_hf.compute_checkpoint_stores`: under ``output_dir/checkpoint-<step>/``, one
    gradient store for the pool (``train/``, or ``train/<part>/`` per sub-pool; ``train_feature`` features, with
    the live optimizer state for ``"adam"``) and one per target task (``<task>/`` or ``<task>/<subtask>/``: plain
    gradients), with the learning rate of the step. All processes of a distributed run take part; each computes
    its share of rows.

    Every dataset is checked when the callback is built (a ``datasets.Dataset`` with rows, integer
    ``input_ids``/``labels`` of equal lengths and, with ``on_bad_row="error"``, a supervised token in every row)
    and again when training begins, where row lengths are checked against the model's limit and the first rows
    are batched for the model: a dataset that could only fail at the first checkpoint is refused before the
    first training step.

    Args:
        pool: the tokenized pool (``input_ids``, ``labels``, model inputs such as ``pixel_values``), or a mapping
            ``part name -> Dataset`` of sub-pools (scored as one pool, in order).
        tasks: ``task -> tokenized validation Dataset``, or ``task -> {subtask -> Dataset}``.
        output_dir: where the stores go (default: ``<TrainingArguments.output_dir>/icons``).
        train_feature: ``"sgd"`` (default: plain gradients, as the released ICONS scripts; better in the easy-VQA
            replica, see the README) or ``"adam"`` (the LESS map of the live optimizer state, as the ICONS/LESS
            papers).
        preset: the ``FeatureSettings`` preset (``"default"``, ``"paper"``).
        settings: a ``FeatureSettings`` (or mapping of its fields) instead of a preset.
        show_progress: progress bars of the extraction on the main process.
        **options: any other field of :class:`icons_hf.settings.FeatureSettings` (``parameters``, ``projection``,
            ``dim``, ``seed``, ``batch_size``, ``max_tokens_per_batch``, ``dtype``, ``on_bad_row``, ``max_length``,
            ``pad_token_id``, ``shard_size``, ``adam_variant``), overriding the preset's (or ``settings``') value
            when given; an unknown name is refused.

    After training, ``callback.stores()`` returns ``(train_paths, tasks)`` for :func:`icons_hf.compute_influence`.
    """

    def __init__(
        self,
        pool,
        tasks: Mapping,
        output_dir: str | os.PathLike | None = None,
        *,
        train_feature: str | None = None,
        preset: str | None = None,
        settings: FeatureSettings | Mapping | None = None,
        show_progress: bool = True,
        **options,
    ):
        self.settings = FeatureSettings.resolve(settings, preset, train_feature=train_feature, **options)
        check_inputs(pool, tasks)
        check_bad_rows(pool, tasks, self.settings)
        self.pool = pool
        self.tasks = tasks
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.show_progress = show_progress
        self.checkpoints: list[dict] = []
        self._step_lr: float | None = None

    @property
    def train_feature(self) -> str:
        return self.settings.train_feature

    @property
    def needs_optimizer_state(self) -> bool:
        """Whether the pool's feature type reads the optimizer's state (``"adam"``)."""
        return FEATURE_TYPES[self.train_feature].needs_optimizer_state

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.output_dir is None:
            self.output_dir = os.path.join(args.output_dir, "icons")
        check_training_arguments(args)
        check_inputs(self.pool, self.tasks)
        check_bad_rows(self.pool, self.tasks, self.settings, model)
        if model is not None:
            check_model_inputs(model, self.pool, self.tasks, self.settings.pad_token_id)
            check_collator(kwargs.get("train_dataloader"), model)
        if self.needs_optimizer_state and optimizer is not None:
            groups = getattr(getattr(optimizer, "optimizer", optimizer), "param_groups", None) or [{}]
            if "betas" not in groups[0]:
                raise ValueError(
                    f"train_feature={self.train_feature!r} needs an Adam/AdamW optimizer, but the Trainer's is "
                    f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__}; use an Adam optimizer (optim= in "
                    "TrainingArguments) or train_feature='sgd'."
                )
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The learning rate this step used (the scheduler moves on right after): the value the Trainer logs.
        if optimizer is not None:
            self._step_lr = float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"])

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("IconsCallback needs the model in on_save; it is meant for transformers.Trainer.")
        state_arg = None
        if self.needs_optimizer_state:
            if optimizer is None:
                raise RuntimeError(f"train_feature={self.train_feature!r} needs the Trainer's optimizer; it was not "
                                   "passed to on_save.")
            state_arg = AdamState.from_optimizer(optimizer, model)
        entry = compute_checkpoint_stores(
            model, self.pool, self.tasks, self.output_dir, settings=self.settings, optimizer_state=state_arg,
            learning_rate=self._step_lr, checkpoint=f"checkpoint-{state.global_step}", step=state.global_step,
            show_progress=self.show_progress,
        )
        self.checkpoints = [c for c in self.checkpoints if c["checkpoint"] != entry["checkpoint"]] + [entry]
        return control

    def stores(self):
        """``(train_paths, tasks)`` of the checkpoints processed so far, ready for ``compute_influence``."""
        if not self.checkpoints:
            raise RuntimeError("no checkpoint has been saved yet; set save_strategy/save_steps in TrainingArguments.")
        return run_stores(self.checkpoints)


_COLLATOR_HINT = (
    "pass data_collator=icons_hf.data.IconsCollator(pad_token_id=tokenizer.pad_token_id) to the Trainer: it pads "
    "input_ids, labels (-100) and attention_mask and stacks the other model inputs, as extraction does"
)


def _collated_problem(batch) -> str | None:
    if not isinstance(batch, dict) or not batch:
        return f"it returned a {type(batch).__name__}, not a dict of tensors"
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            return f"its {key!r} is a {type(value).__name__}, not a tensor"
    if "labels" not in batch:
        return "it returned no 'labels', so the Trainer would have no loss"
    if "input_ids" in batch and batch["labels"].shape != batch["input_ids"].shape:
        return f"its labels have shape {tuple(batch['labels'].shape)} but input_ids {tuple(batch['input_ids'].shape)}"
    return None


def check_collator(train_dataloader, model, rows: int = 2) -> None:
    """Collate the first ``rows`` training rows with the Trainer's own data collator and run ``model`` on the batch
    (eval mode, no gradient, so neither dropout's random state nor any weight changes): a collator that cannot
    batch the rows, or batches them into something the model cannot take, is refused before the first step with
    an error naming :class:`icons_hf.data.IconsCollator` (instead of a traceback from inside the training loop)."""
    collate = getattr(train_dataloader, "collate_fn", None)
    dataset = getattr(train_dataloader, "dataset", None)
    try:
        size = len(dataset)
    except TypeError:  # an iterable dataset: its rows cannot be read without consuming them
        return
    if collate is None or size == 0:
        return
    name = type(getattr(collate, "data_collator", collate)).__name__
    try:
        batch = collate([dataset[i] for i in range(min(rows, size))])
        problem = _collated_problem(batch)
        if problem is None:
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model(**{k: v.to(device) for k, v in batch.items()})
            finally:
                model.train(was_training)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as err:
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if problem is not None:
        raise ValueError(
            f"the Trainer's data collator ({name}) cannot batch the training rows for the model: {problem}. "
            f"IconsCallback checked this before the first step; {_COLLATOR_HINT}."
        )


def check_training_arguments(args) -> None:
    """Refuse, before the first step, a Trainer setup in which the callback would compute nothing or could not
    compute features: no checkpoint is ever saved, or parameters/optimizer states are sharded (DeepSpeed, FSDP)."""
    strategy = getattr(args, "save_strategy", "steps")
    if getattr(strategy, "value", strategy) == "no":
        raise ValueError(
            "TrainingArguments(save_strategy='no') saves no checkpoint, so IconsCallback would compute no features; "
            "set save_strategy='steps' with save_steps (features are computed at every save)."
        )
    sharded = [name for name, on in (("DeepSpeed", getattr(args, "deepspeed", None)),
                                     ("FSDP", getattr(args, "fsdp", None))) if on]
    if sharded:
        raise ValueError(
            f"this run uses {sharded[0]}, which shards parameters or optimizer states across processes; IconsCallback "
            "does not support it. Warm up without the callback and compute the features from the saved checkpoints "
            "with icons_hf.compute_checkpoint_stores under DDP or one process."
        )


__all__ = ["RUN_FILE", "IconsCallback", "check_collator", "check_training_arguments", "load_run", "run_stores"]
