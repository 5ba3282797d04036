"""A checkpoint's gradient stores: the pool's (one store, or one per sub-pool) and every task's validation stores.

:func:`compute_checkpoint_stores` is what :class:`icons_hf.IconsCallback` runs at each save of a Trainer run, and
what offline extraction runs on a saved Trainer checkpoint, so both write the same layout::

    <output_dir>/icons_run.json                     the run: one entry per checkpoint (read by load_run)
    <output_dir>/<checkpoint>/train/                the pool's store (train_feature)
    <output_dir>/<checkpoint>/train/<part>/         or one store per sub-pool, when the pool is a mapping
    <output_dir>/<checkpoint>/<task>[/<subtask>]/   each task's validation store (plain gradients)

A pool given as a mapping ``part name -> Dataset`` (e.g. LLaVA-665K's image rows and text-only rows, which batch
differently) gives one store per part; influence scores the parts of a checkpoint as one pool, in the mapping's
order (part ``i``'s row ``r`` is row ``r`` plus the rows of the parts before it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping

from .distributed import is_main_process
from .features import FEATURE_TYPES
from .gradients import compute_gradients
from .gradients.inputs import (
    check_dataset,
    check_model_batch,
    check_rows,
    count_bad_rows,
    max_positions,
    unwrap_model,
)
from .gradients.precondition import checkpoint_learning_rate
from .settings import NAME_PATTERN, FeatureSettings

logger = logging.getLogger(__name__)

RUN_FILE = "icons_run.json"
TRAIN_DIR = "train"
_STEP = re.compile(r"checkpoint-(\d+)$")


def check_name(kind: str, name) -> None:
    """Refuse a task, subtask, sub-pool or checkpoint name that cannot be a folder name of its own."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise ValueError(f"{kind} name {name!r} may only use letters, digits, '_', '.', '-'; rename it.")


def pool_parts(pool) -> dict[str | None, object]:
    """``part name -> Dataset`` of a pool given as one Dataset (one part, named ``None``) or a mapping."""
    if isinstance(pool, Mapping):
        if not pool:
            raise ValueError("pool is an empty mapping; give at least one sub-pool name -> Dataset.")
        for part in pool:
            check_name("sub-pool", part)
        return dict(pool)
    return {None: pool}


def task_items(tasks: Mapping) -> Iterator[tuple[str, str | None, object, str]]:
    """``(task, subtask or None, dataset, folder relative to the checkpoint's)`` of every validation set."""
    for name, spec in tasks.items():
        if isinstance(spec, Mapping):
            for sub, dataset in spec.items():
                yield name, sub, dataset, os.path.join(name, sub)
        else:
            yield name, None, spec, name


def _task_label(task: str, sub: str | None) -> str:
    return f"tasks[{task!r}]" + (f"[{sub!r}]" if sub is not None else "")


def labelled_datasets(pool, tasks: Mapping) -> list[tuple[str, object]]:
    """``(label, dataset)`` of the pool's parts and of every validation set, labels as a user would write them."""
    out = [("pool" if part is None else f"pool[{part!r}]", data) for part, data in pool_parts(pool).items()]
    return out + [(_task_label(task, sub), data) for task, sub, data, _ in task_items(tasks)]


def _empty_message(label: str, pool, tasks: Mapping, data) -> str:
    if label.startswith("pool"):
        return f"the pool has no rows ({label} is empty); there is nothing to select from."
    for task, sub, candidate, _ in task_items(tasks):
        if candidate is data:
            where = f"task {task!r}" + (f" subtask {sub!r}" if sub is not None else "")
            return f"{where} has no validation rows; give every task at least one example."
    return f"{label} is empty."


def check_inputs(pool, tasks) -> None:
    """Refuse, naming the dataset and the fix, inputs that could only fail later: tasks that are not a mapping,
    names that cannot be folders, a dataset that is not a ``datasets.Dataset``, has no rows, lacks ``input_ids``
    or ``labels`` or holds token columns that are not integer lists."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty mapping task name -> validation Dataset.")
    for task, spec in tasks.items():
        check_name("task", task)
        if task == TRAIN_DIR:
            raise ValueError(f"task name {task!r} is the folder of the pool's store; rename the task.")
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError(f"task {task!r} is an empty mapping; give it at least one subtask -> Dataset.")
            for sub in spec:
                check_name("subtask", sub)
    for label, data in labelled_datasets(pool, tasks):
        try:
            check_dataset(data, label)
        except ValueError as err:
            if "is empty" not in str(err):
                raise
            raise ValueError(_empty_message(label, pool, tasks, data)) from None


def check_model_inputs(model, pool, tasks, pad_token_id: int = 0) -> None:
    """Collate the first rows of every dataset as extraction will, for ``model``: a column that cannot be batched
    is refused here, naming the dataset and the column, instead of at the first checkpoint."""
    for label, data in labelled_datasets(pool, tasks):
        left_out = check_model_batch(model, data, label, pad_token_id=pad_token_id)
        if left_out and is_main_process():
            logger.info("%s: column(s) %s are not model inputs and are left out of the model call.", label,
                        ", ".join(left_out))


def check_bad_rows(pool, tasks: Mapping, settings: FeatureSettings, model=None) -> None:
    """With ``on_bad_row="error"``, refuse now (naming the dataset and row) a row that extraction would refuse at
    the first checkpoint and that its tokens show: no supervised token, or, with ``model``, more tokens than its
    position limit. With ``"skip"``, refuse a dataset that would lose every row (a task left without validation
    examples, or an empty pool), which would otherwise only fail in ``compute_influence`` after the warmup."""
    limit = None if model is None else max_positions(unwrap_model(model))
    pool_left = []
    for label, data in labelled_datasets(pool, tasks):
        if settings.on_bad_row == "error":
            check_rows(data, label, max_length=settings.max_length, limit=limit)
            continue
        bad, problem = count_bad_rows(data, max_length=settings.max_length, limit=limit)
        if label.startswith("pool"):  # sub-pools: only a pool left with no row at all is refused
            pool_left.append((len(data) - bad, label, bad, problem))
        elif bad == len(data):
            _refuse_emptied(label, bad, problem, limit, "that task would have no validation example, and influence "
                            "needs at least one")
    if pool_left and not any(left for left, *_ in pool_left):
        _refuse_emptied(*pool_left[0][1:], limit, "the pool would have no row to select from")


def _refuse_emptied(label: str, bad: int, problem: str | None, limit: int | None, what: str) -> None:
    raise ValueError(
        f"{label}: every one of its {bad} rows would be skipped under on_bad_row='skip' (row 0: {problem}), so "
        f"{what}. Fix the rows (each needs a supervised token in labels, -100 elsewhere"
        f"{'' if limit is None else f', and at most {limit} tokens or max_length='}) before training."
    )


def _checkpoint_facts(checkpoint, learning_rate, optimizer_state, step, train_feature: str):
    """``(name, learning rate, optimizer state, step)``: a Trainer checkpoint folder gives its name, its logged
    learning rate, its ``optimizer.pt`` (for a feature type that needs optimizer state) and its step unless they
    are given."""
    folder = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    if folder is not None and os.path.isdir(folder):
        name = os.path.basename(os.path.normpath(folder))
        if learning_rate is None:
            learning_rate = checkpoint_learning_rate(folder)
        if optimizer_state is None and FEATURE_TYPES[train_feature].needs_optimizer_state:
            optimizer_state = folder
    elif folder is not None:
        if os.sep in folder or (os.altsep and os.altsep in folder):
            raise FileNotFoundError(
                f"checkpoint={folder!r} is not a folder; pass a Trainer checkpoint folder or a name."
            )
        name = folder
    elif isinstance(optimizer_state, (str, os.PathLike)) and os.path.isdir(optimizer_state):
        name = os.path.basename(os.path.normpath(os.fspath(optimizer_state)))
    else:
        raise ValueError(
            "checkpoint= is needed: a name for the checkpoint's folder of stores (e.g. 'checkpoint-500') or the "
            "Trainer checkpoint folder itself."
        )
    check_name("checkpoint", name)
    if step is None and _STEP.search(name):
        step = int(_STEP.search(name).group(1))
    return name, learning_rate, optimizer_state, step


def compute_checkpoint_stores(
    model, pool, tasks: Mapping, output_dir: str | os.PathLike, *, settings: FeatureSettings | Mapping | None = None,
    preset: str | None = None, optimizer_state=None, learning_rate: float | None = None,
    checkpoint: str | os.PathLike | None = None, step: int | None = None, show_progress: bool = True, **options,
) -> dict:
    """Compute one checkpoint's gradient stores and record them in ``output_dir/icons_run.json``.

    Args:
        model: the model at the checkpoint (e.g. ``PeftModel.from_pretrained(base, ckpt, is_trainable=True)``).
        pool: a tokenized ``datasets.Dataset``, or a mapping ``part name -> Dataset`` (sub-pools, one store each,
            scored later as one pool in the mapping's order).
        tasks: ``task -> validation Dataset`` or ``task -> {subtask -> Dataset}``.
        output_dir: the run's folder; the stores go under ``output_dir/<checkpoint name>/`` (module docstring).
        settings, preset: the :class:`~icons_hf.settings.FeatureSettings` to start from (default: the
            ``"default"`` preset). The pool gets ``train_feature``, validation sets plain gradients.
        optimizer_state: the checkpoint's Adam state, needed for ``train_feature="adam"`` (see
            :func:`icons_hf.compute_gradients`); default: the checkpoint folder's ``optimizer.pt``.
        learning_rate: the checkpoint's learning rate (weights it in influence); default: the one its
            ``trainer_state.json`` logged.
        checkpoint: the name of the checkpoint's folder of stores (``"checkpoint-500"``), or a Trainer checkpoint
            folder (its name, learning rate and optimizer state are then read from it).
        step: the training step (default: from a ``checkpoint-<step>`` name).
        show_progress: progress bars on the main process.
        **options: any field of :class:`~icons_hf.settings.FeatureSettings` (``train_feature``, ``projection``,
            ``dim``, ``batch_size``, ...), overriding the preset's or ``settings``' value when given (not ``None``);
            an unknown name is refused.

    Returns:
        The run entry ``{"checkpoint", "step", "learning_rate", "train": path (or [paths] for sub-pools),
        "tasks": {task: path or {subtask: path}}}``, as :func:`icons_hf.load_run` reads it back. Under
        ``accelerate launch``/``torchrun`` call it in every process with the same arguments.
    """
    settings = FeatureSettings.resolve(settings, preset, **options)
    check_inputs(pool, tasks)
    name, lr, state, step = _checkpoint_facts(checkpoint, learning_rate, optimizer_state, step, settings.train_feature)
    root = os.path.join(os.fspath(output_dir), name)
    parts = pool_parts(pool)
    if is_main_process():
        rows = sum(len(d) for d in parts.values())
        logger.info("ICONS features for %s: %d pool rows in %d store(s), %d validation store(s), under %s", name,
                    rows, len(parts), sum(1 for _ in task_items(tasks)), root)
    common = dict(settings=settings, learning_rate=lr, checkpoint=name, show_progress=show_progress)
    train = [
        compute_gradients(model, data, output_dir=os.path.join(root, TRAIN_DIR, *([part] if part else [])),
                          feature=settings.train_feature, optimizer_state=state, **common)
        for part, data in parts.items()
    ]
    entry = {"checkpoint": name, "step": step, "learning_rate": lr,
             "train": train if isinstance(pool, Mapping) else train[0], "tasks": {}}
    for task, sub, data, rel in task_items(tasks):
        path = compute_gradients(model, data, output_dir=os.path.join(root, rel), feature="sgd", **common)
        if sub is None:
            entry["tasks"][task] = path
        else:
            entry["tasks"].setdefault(task, {})[sub] = path
    record_checkpoint(output_dir, entry)
    return entry


def record_checkpoint(output_dir: str | os.PathLike, entry: Mapping) -> None:
    """Add ``entry`` to ``output_dir/icons_run.json`` (replacing an entry of the same checkpoint), on the main
    process; the file is replaced atomically."""
    if not is_main_process():
        return
    path = os.path.join(os.fspath(output_dir), RUN_FILE)
    entries = read_run(output_dir)["checkpoints"] if os.path.isfile(path) else []
    entries = [e for e in entries if e.get("checkpoint") != entry["checkpoint"]] + [dict(entry)]
    os.makedirs(os.fspath(output_dir), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump({"checkpoints": entries}, handle, indent=2)
    os.replace(tmp, path)


def read_run(output_dir: str | os.PathLike) -> dict:
    """The ``icons_run.json`` of a run folder, with a clear error when there is none."""
    path = os.path.join(os.fspath(output_dir), RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; point at the folder IconsCallback or compute_checkpoint_stores wrote (the "
            "callback's default is <TrainingArguments.output_dir>/icons)."
        )
    with open(path) as handle:
        run = json.load(handle)
    if not isinstance(run, Mapping) or not isinstance(run.get("checkpoints"), list):
        raise ValueError(f"{path} is not an icons_hf run file (no 'checkpoints' list).")
    return run


def run_stores(checkpoints) -> tuple[list, dict]:
    """``(train, tasks)`` for :func:`icons_hf.compute_influence` from run entries: ``train`` holds one path per
    checkpoint (or one list of sub-pool paths), ``tasks`` one path list per task (or per subtask)."""
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


def load_run(output_dir: str | os.PathLike) -> tuple[list, dict]:
    """``(train_paths, tasks)`` of a folder written by ``IconsCallback`` or ``compute_checkpoint_stores`` (its
    ``icons_run.json``), in the order the checkpoints were computed."""
    return run_stores(read_run(output_dir)["checkpoints"])


__all__ = [
    "RUN_FILE",
    "check_bad_rows",
    "check_inputs",
    "check_model_inputs",
    "compute_checkpoint_stores",
    "load_run",
    "record_checkpoint",
    "run_stores",
]
