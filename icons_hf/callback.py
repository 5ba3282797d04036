"""``IconsCallback``: gradient features at every checkpoint of a warmup ``transformers.Trainer`` run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from transformers import TrainerCallback

from .config import validate_choice
from .gradients import ADAM_VARIANTS, FEATURES, PROJECTIONS, compute_gradients
from .gradients.precondition import AdamState
from .influence import _TASK_NAME

logger = logging.getLogger(__name__)

RUN_FILE = "icons_run.json"


class IconsCallback(TrainerCallback):
    """Computes ICONS gradient features whenever the Trainer saves a checkpoint.

    At each save it writes, under ``output_dir/checkpoint-<step>/``, one gradient store for the pool
    (``train/``: ``train_feature`` features: plain gradients by default, or Adam-preconditioned with the live
    optimizer state) and
    one per target task (``<task>/`` or ``<task>/<subtask>/``: plain SGD gradients), and records the
    checkpoint's learning rate. All processes of a distributed run take part; each computes its share of rows.

    Args:
        pool: the tokenized pool (``input_ids``, ``labels``, model inputs such as ``pixel_values``).
        tasks: ``task -> tokenized validation Dataset``, or ``task -> {subtask -> Dataset}``.
        output_dir: where the stores go (default: ``<TrainingArguments.output_dir>/icons``).
        train_feature: ``"sgd"`` (default: plain gradients, as the released ICONS scripts use; in the easy-VQA
            replica every selection rule did better with them, see the README) or ``"adam"`` (the LESS map of
            the live optimizer state, as in the ICONS/LESS papers).
        adam_variant, projection, dim, seed, batch_size, dtype, on_bad_row, max_length, pad_token_id, shard_size: as in
            :func:`icons_hf.compute_gradients`.

    After training, ``callback.stores()`` returns ``(train_paths, tasks)`` for :func:`icons_hf.compute_influence`.
    """

    def __init__(
        self,
        pool,
        tasks: Mapping,
        output_dir: str | os.PathLike | None = None,
        *,
        train_feature: str = "sgd",
        adam_variant: str = "less",
        projection: str = "countsketch",
        dim: int = 8192,
        seed: int = 0,
        batch_size: int = 8,
        dtype: str = "float16",
        on_bad_row: str = "error",
        max_length: int | None = None,
        pad_token_id: int = 0,
        shard_size: int = 4096,
    ):
        validate_choice("train_feature", train_feature, FEATURES)
        validate_choice("adam_variant", adam_variant, ADAM_VARIANTS)
        validate_choice("projection", projection, PROJECTIONS)
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("tasks must be a non-empty mapping task name -> validation Dataset.")
        for name, spec in tasks.items():
            subs = spec if isinstance(spec, Mapping) else {name: spec}
            for sub, ds in subs.items():
                if not _TASK_NAME.match(str(sub)):
                    raise ValueError(f"task/subtask name {sub!r} may only use letters, digits, '_', '.', '-'.")
                if len(ds) == 0:
                    where = f"task {name!r}" + (f" subtask {sub!r}" if isinstance(spec, Mapping) else "")
                    raise ValueError(f"{where} has no validation rows; give every task at least one example.")
        if len(pool) == 0:
            raise ValueError("the pool has no rows; there is nothing to select from.")
        self.pool = pool
        self.tasks = tasks
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.train_feature = train_feature
        self.options = dict(
            adam_variant=adam_variant, projection=projection, dim=dim, seed=seed, batch_size=batch_size, dtype=dtype,
            on_bad_row=on_bad_row, max_length=max_length, pad_token_id=pad_token_id, shard_size=shard_size,
        )
        self.checkpoints: list[dict] = []
        self._step_lr: float | None = None

    def _task_items(self):
        for name, spec in self.tasks.items():
            if isinstance(spec, Mapping):
                for sub, ds in spec.items():
                    yield name, sub, ds, os.path.join(name, sub)
            else:
                yield name, None, spec, name

    def on_train_begin(self, args, state, control, **kwargs):
        if self.output_dir is None:
            self.output_dir = os.path.join(args.output_dir, "icons")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The learning rate this step used (the scheduler moves on right after): the value the Trainer logs.
        if optimizer is not None:
            self._step_lr = float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"])

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("IconsCallback needs the model in on_save; it is meant for transformers.Trainer.")
        name = f"checkpoint-{state.global_step}"
        root = os.path.join(self.output_dir, name)
        lr = self._step_lr
        state_arg = None
        if self.train_feature == "adam":
            if optimizer is None:
                raise RuntimeError("train_feature='adam' needs the Trainer's optimizer; it was not passed to on_save.")
            state_arg = AdamState.from_optimizer(optimizer, model)
        logger.info("ICONS features for %s (learning rate %s)", name, lr)
        common = dict(self.options, learning_rate=lr, checkpoint=name)
        train_path = compute_gradients(
            model, self.pool, output_dir=os.path.join(root, "train"), feature=self.train_feature,
            optimizer_state=state_arg, **common,
        )
        entry = {"checkpoint": name, "step": state.global_step, "learning_rate": lr, "train": train_path, "tasks": {}}
        for task, sub, ds, rel in self._task_items():
            path = compute_gradients(model, ds, output_dir=os.path.join(root, rel), feature="sgd", **common)
            if sub is None:
                entry["tasks"][task] = path
            else:
                entry["tasks"].setdefault(task, {})[sub] = path
        self.checkpoints.append(entry)
        if state.is_world_process_zero:
            with open(os.path.join(self.output_dir, RUN_FILE), "w") as handle:
                json.dump({"checkpoints": self.checkpoints}, handle, indent=2)
        return control

    def stores(self):
        """``(train_paths, tasks)`` of the checkpoints processed so far, ready for ``compute_influence``."""
        if not self.checkpoints:
            raise RuntimeError("no checkpoint has been saved yet; set save_strategy/save_steps in TrainingArguments.")
        return run_stores(self.checkpoints)


def run_stores(checkpoints) -> tuple[list[str], dict]:
    train = [c["train"] for c in checkpoints]
    tasks: dict = {}
    for c in checkpoints:
        for task, spec in c["tasks"].items():
            if isinstance(spec, Mapping):
                for sub, path in spec.items():
                    tasks.setdefault(task, {}).setdefault(sub, []).append(path)
            else:
                tasks.setdefault(task, []).append(spec)
    return train, tasks


def load_run(output_dir: str | os.PathLike) -> tuple[list[str], dict]:
    """``(train_paths, tasks)`` of a folder written by ``IconsCallback`` (its ``icons_run.json``)."""
    path = os.path.join(os.fspath(output_dir), RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; point at the IconsCallback output_dir (default <output_dir>/icons).")
    with open(path) as handle:
        return run_stores(json.load(handle)["checkpoints"])
