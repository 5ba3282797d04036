"""The building blocks of the example recipes (``examples/llava/icons_llava.py``, ``examples/text/icons_text.py``).

A recipe is ``make_parser()`` + ``main()``: its own model and pool options, then :func:`add_recipe_arguments`
(output, tasks, LoRA, warmup, and every field of :class:`~icons_hf.settings.FeatureSettings`,
:class:`~icons_hf.settings.InfluenceSettings` and :class:`~icons_hf.settings.SelectionSettings` as options whose
defaults stay in those classes), :func:`parse_recipe_args`, and the stages:

1. :func:`pool_stores`: a LoRA warmup on a random share of the pool with ``transformers.Trainer`` and
   :class:`~icons_hf.IconsCallback`, or (``--checkpoints``) :func:`~icons_hf.compute_checkpoint_stores` on
   checkpoints saved earlier;
2. :func:`pool_scores`: :func:`~icons_hf.compute_influence` over the pool's parts, rows at pool positions;
3. :func:`select_and_export`: :func:`~icons_hf.select`, :func:`~icons_hf.export_selection` and, with
   ``--push-to-hub``, :func:`~icons_hf.push_selection`.

A pool may come in parts (:class:`SubPool`) that are batched separately (LLaVA-665K mixes image and text-only
rows): each part keeps the pool positions of its rows, so the selection and the export refer to the pool's rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import PartialState
from datasets import DatasetDict, load_dataset, load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .callback import IconsCallback
from .checkpoints import compute_checkpoint_stores, run_stores
from .consensus import select
from .export import export_selection
from .gradients.inputs import collate_rows
from .hub import push_selection
from .influence import compute_influence
from .options import add_dataclass_options, given_options
from .pools import load_records
from .provenance import Provenance
from .settings import NAME_PATTERN, PRESETS, FeatureSettings, InfluenceSettings, SelectionSettings

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"

# Settings fields whose names two stages share get a stage-specific option name.
SETTINGS_OPTIONS = (
    ("features", FeatureSettings, {"seed": "projection_seed", "batch_size": "feature_batch_size",
                                   "dtype": "feature_dtype"}, ("pad_token_id",)),
    ("influence", InfluenceSettings, {"batch_size": "influence_batch_size"}, ()),
    ("selection", SelectionSettings, {"seed": "selection_seed", "task": "select_task"}, ()),
)


def _help(text: str, **extra) -> dict:
    return {"metadata": {"help": text, **extra}}


@dataclass
class RecipeArguments:
    """Where the recipe writes, what it selects for, and where the features come from."""

    output_dir: str = field(default=None, **_help(
        "where checkpoints (warmup/), gradient features (warmup/icons/ or icons/) and the subset (subset/) go",
        required=True))
    task: list[str] = field(default_factory=list, **_help(
        "a target task's validation rows; repeatable. SOURCE: a .json/.jsonl file, a folder written by "
        "Dataset.save_to_disk, or hub:REPO_ID[@SPLIT] (default split: validation). NAME/SUBTASK entries form one "
        "task (MME-style)", action="append", metavar="NAME[/SUBTASK]=SOURCE[:IMAGE_FOLDER]"))
    max_validation_rows: int | None = field(default=None, **_help(
        "keep at most this many validation rows per (sub)task, drawn with --seed"))
    preset: str | None = field(default=None, **_help(
        "settings preset of all three stages ('paper': the released ICONS rule); options given explicitly override "
        "it", choices=PRESETS))
    checkpoints: list[str] | None = field(default=None, **_help(
        "skip the warmup: compute features from these saved Trainer checkpoints (LoRA adapter, and optimizer.pt for "
        "--train-feature adam), in training order", nargs="+", metavar="CHECKPOINT_DIR"))
    no_features: bool = field(default=False, **_help(
        "only warm up and save checkpoints (for ZeRO-3/FSDP runs); extract later with --checkpoints"))
    license: str | None = field(default=None, **_help("license of the subset for the dataset card"))
    pretty_name: str | None = field(default=None, **_help("title of the dataset card"))
    tag: list[str] = field(default_factory=list, **_help("extra Hub tag for the card; repeatable", action="append"))
    push_to_hub: str | None = field(default=None, **_help(
        "push the exported subset to this Hub dataset repository", metavar="REPO_ID"))
    hub_private: bool = field(default=False, **_help("create the Hub repository as private"))


@dataclass
class LoraArguments:
    """The warmup's LoRA adapter (peft)."""

    lora_r: int = field(default=128, **_help("LoRA rank (as ICONS/LESS)"))
    lora_alpha: float | None = field(default=None, **_help("LoRA alpha (default: 2 * r, as ICONS)"))
    lora_dropout: float = field(default=0.05, **_help("dropout on the LoRA input"))
    lora_target_modules: list[str] | None = field(default=None, **_help(
        "names of the modules to adapt (peft suffix match); replaces the script's default", nargs="+"))
    lora_target_regex: str | None = field(default=None, **_help(
        "a regular expression (peft full match) of the module names to adapt; replaces the script's default"))
    modules_to_save: list[str] = field(default_factory=list, **_help(
        "modules trained in full beside the adapters (e.g. multi_modal_projector)", nargs="*"))


@dataclass
class WarmupArguments:
    """The warmup run (transformers.Trainer)."""

    warmup_fraction: float = field(default=0.05, **_help(
        "share of the pool drawn at random (with --seed) for the warmup (as LESS)"))
    num_train_epochs: float = field(default=1.0, **_help("warmup epochs over the warmup sample"))
    max_steps: int = field(default=-1, **_help("stop after this many optimizer steps (overrides epochs)"))
    num_checkpoints: int = field(default=4, **_help(
        "checkpoints to extract features at, spread evenly over the run (as LESS)"))
    per_device_train_batch_size: int = field(default=4, **_help("warmup rows per process and step"))
    gradient_accumulation_steps: int = field(default=1, **_help("micro-batches per optimizer step"))
    learning_rate: float = field(default=2e-4, **_help("peak learning rate of the warmup"))
    lr_scheduler_type: str = field(default="linear", **_help("transformers scheduler name"))
    warmup_steps: float = field(default=0.03, **_help("learning-rate warmup: steps, or a ratio of the run if below 1"))
    weight_decay: float = field(default=0.0, **_help("AdamW weight decay"))
    logging_steps: int = field(default=10, **_help("log the loss every this many steps (and at every save)"))
    bf16: bool = field(default=False, **_help("train with bfloat16 autocast (GPUs)"))
    use_cpu: bool = field(default=False, **_help("run on the CPU even where a GPU is present (implied without one)"))
    gradient_checkpointing: bool = field(default=False, **_help("recompute activations in the warmup backward pass"))
    seed: int = field(default=0, **_help("seed of the warmup sample, training and validation subsample"))


RECIPE_GROUPS = (("recipe", RecipeArguments), ("lora", LoraArguments), ("warmup", WarmupArguments))


@dataclass
class Recipe:
    """Everything a recipe run was asked for, parsed and validated."""

    recipe: RecipeArguments
    lora: LoraArguments
    warmup: WarmupArguments
    features: FeatureSettings
    influence: InfluenceSettings
    selection: SelectionSettings
    tasks: list[TaskSpec]


@dataclass
class TaskSpec:
    task: str
    subtask: str | None
    source: str
    image_folder: str | None


@dataclass
class SubPool:
    """Formatted rows of one part of the pool, and the pool positions of those rows (ascending)."""

    name: str
    dataset: object
    positions: np.ndarray


# ----------------------------------------------------------------------------------------------- arguments


def add_recipe_arguments(parser: argparse.ArgumentParser, **script_defaults) -> None:
    """The options every recipe shares; ``script_defaults`` (e.g. ``learning_rate=2e-5``,
    ``lora_target_modules=[...]``) replace the recipe dataclasses' defaults for this script."""
    for _, cls in RECIPE_GROUPS:
        add_dataclass_options(parser, cls)
    for stage, cls, renames, skip in SETTINGS_OPTIONS:
        add_dataclass_options(parser, cls, dest_prefix=f"{stage}.", renames=renames, skip=skip,
                                keep_defaults=False, title=f"{cls.__name__} (--preset and icons_hf.settings)")
    parser.set_defaults(**script_defaults, _script_defaults=script_defaults)


def _settings(args: argparse.Namespace, stage: str, cls, **extra):
    given = given_options(args, cls, dest_prefix=f"{stage}.")
    if "checkpoint_weights" in given:
        given["checkpoint_weights"] = tuple(given["checkpoint_weights"])
    return cls.resolve(None, args.preset, **given, **extra)


def parse_recipe_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """``(args, recipe)``: the raw namespace (the script's own options) and the validated :class:`Recipe`.
    A bad value exits with the parser's usage and a message naming the option (exit code 2). The features'
    ``pad_token_id`` is the tokenizer's: set it with :func:`with_pad_token` once the tokenizer is loaded."""
    args = parser.parse_args(argv)
    _pick_lora_targets(parser, args)
    groups = {name: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
              for name, cls in RECIPE_GROUPS}
    try:
        recipe = Recipe(**groups, features=_settings(args, "features", FeatureSettings),
                        influence=_settings(args, "influence", InfluenceSettings),
                        selection=_settings(args, "selection", SelectionSettings), tasks=parse_task_specs(args.task))
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    _check(parser, recipe)
    return args, recipe


def with_pad_token(recipe: Recipe, pad_token_id: int) -> Recipe:
    """``recipe`` with the tokenizer's pad token id in its feature settings (padding is masked either way)."""
    return dataclasses.replace(recipe, features=dataclasses.replace(recipe.features, pad_token_id=pad_token_id))


def _pick_lora_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The LoRA target option given on the command line replaces the script's default of the other one."""
    defaults = args._script_defaults
    modules_given = args.lora_target_modules != defaults.get("lora_target_modules")
    regex_given = args.lora_target_regex != defaults.get("lora_target_regex")
    if modules_given and regex_given:
        parser.error("give --lora-target-modules or --lora-target-regex, not both")
    if modules_given:
        args.lora_target_regex = None
    elif regex_given:
        args.lora_target_modules = None


def _check(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    r, w = recipe.recipe, recipe.warmup
    if not recipe.tasks:
        parser.error("give at least one target task with --task NAME=SOURCE")
    if r.checkpoints is None and not 0 < w.warmup_fraction <= 1:
        parser.error(f"--warmup-fraction {w.warmup_fraction} must be in (0, 1]")
    if w.num_checkpoints < 1:
        parser.error("--num-checkpoints must be at least 1")
    if r.checkpoints and r.no_features:
        parser.error("--checkpoints computes features from saved checkpoints; it cannot be combined with --no-features")
    if recipe.selection.method == "task" and not recipe.selection.task:
        parser.error("--method task needs --select-task NAME")
    for path in r.checkpoints or []:
        if not os.path.isdir(path):
            parser.error(f"--checkpoints: {path} is not a folder; pass Trainer checkpoint-N folders")


# -------------------------------------------------------------------------------------------------- tasks


def _split_source(spec: str, value: str) -> tuple[str, str | None]:
    """``(source, image folder or None)`` of a ``--task`` value ``SOURCE[:IMAGE_FOLDER]``."""
    if value.startswith(HUB_PREFIX):
        repo, colon, folder = value[len(HUB_PREFIX):].partition(":")
        return HUB_PREFIX + repo, (folder or None) if colon else None
    if os.path.exists(value) or ":" not in value:
        source, folder = value, None
    else:
        source, folder = value.rsplit(":", 1)
    if not os.path.exists(source):
        raise FileNotFoundError(f"--task {spec!r}: {source} does not exist (expected a .json/.jsonl file, a "
                                "save_to_disk folder or hub:REPO_ID[@SPLIT]).")
    if folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(f"--task {spec!r}: image folder {folder} does not exist.")
    return source, folder


def parse_task_specs(specs: Sequence[str]) -> list[TaskSpec]:
    """``NAME[/SUBTASK]=SOURCE[:IMAGE_FOLDER]`` strings as task specifications (see ``--task``)."""
    out, seen = [], set()
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--task {spec!r}: expected NAME=SOURCE, e.g. --task vqa=vqa_val.json:images")
        task, _, sub = name.partition("/")
        for part in (task, sub) if sub else (task,):
            if not NAME_PATTERN.match(part):
                raise ValueError(f"--task {spec!r}: {part!r} may only use letters, digits, '_', '.', '-'.")
        if (task, sub) in seen:
            raise ValueError(f"--task {spec!r}: {name} is given twice.")
        seen.add((task, sub))
        out.append(TaskSpec(task, sub or None, *_split_source(spec, value)))
    both = {s.task for s in out if s.subtask} & {s.task for s in out if not s.subtask}
    if both:
        raise ValueError(f"task {sorted(both)[0]!r} is given both with and without a /SUBTASK.")
    return out


def load_rows(source: str, *, what: str):
    """Rows of a ``.json``/``.jsonl`` file (a list of dicts), a ``save_to_disk`` folder or ``hub:REPO[@SPLIT]``."""
    if source.startswith(HUB_PREFIX):
        repo, _, split = source[len(HUB_PREFIX):].partition("@")
        return load_dataset(repo, split=split or "validation")
    if os.path.isdir(source):
        data = load_from_disk(source)
        if isinstance(data, DatasetDict):
            raise ValueError(f"{what} {source} holds several splits ({', '.join(data)}); pass the folder of one split.")
        return data
    if source.endswith((".json", ".jsonl")):
        return load_records(source)
    raise ValueError(f"{what} {source}: expected a .json/.jsonl file, a save_to_disk folder or hub:REPO_ID[@SPLIT].")


def task_datasets(recipe: Recipe, prepare: Callable[[object, TaskSpec], object]) -> dict:
    """``task -> Dataset`` or ``task -> {subtask -> Dataset}``: every ``--task``'s rows (at most
    ``--max-validation-rows``, drawn with ``--seed``, kept in order) formatted by ``prepare(rows, spec)``."""
    tasks: dict = {}
    limit, seed = recipe.recipe.max_validation_rows, recipe.warmup.seed
    for spec in recipe.tasks:
        rows = load_rows(spec.source, what=f"--task {spec.task}")
        if limit is not None and len(rows) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
            rows = rows.select(keep.tolist()) if hasattr(rows, "select") else [rows[int(i)] for i in keep]
        data = prepare(rows, spec)
        if spec.subtask:
            tasks.setdefault(spec.task, {})[spec.subtask] = data
        else:
            tasks[spec.task] = data
    return tasks


# -------------------------------------------------------------------------------------------------- processes


def on_cpu(warmup: WarmupArguments) -> bool:
    """Whether to run on the CPU: asked for, or no GPU (CUDA, XPU, MPS) is present."""
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    gpu = torch.cuda.is_available() or any(d is not None and d.is_available() for d in (xpu, mps))
    return warmup.use_cpu or not gpu


def process_state(recipe: Recipe) -> PartialState:
    """The accelerate process state of this run. Processes started by ``accelerate launch``/``torchrun`` on a
    machine without GPUs join one CPU process group (gloo) instead of each running alone; logging is set up
    (INFO on the main process)."""
    state = PartialState(cpu=on_cpu(recipe.warmup))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but this one runs in a group of {state.num_processes}; "
            "check that the accelerate config matches the machine (a GPU config without GPUs needs --use-cpu)."
        )
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return state


# ----------------------------------------------------------------------------------------------------- warmup


def attach_lora(model, lora: LoraArguments, *, seed: int, gradient_checkpointing: bool = False):
    set_seed(seed)  # the same adapter initialisation in every process and every run
    config = LoraConfig(
        r=lora.lora_r, lora_alpha=lora.lora_alpha if lora.lora_alpha is not None else 2 * lora.lora_r,
        lora_dropout=lora.lora_dropout, target_modules=lora.lora_target_regex or list(lora.lora_target_modules),
        modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


class WarmupRows(torch.utils.data.Dataset):
    """The warmup sample (pool positions) as a map-style dataset over the sub-pools' formatted rows; rows of
    different sub-pools may share a batch (:class:`MixedCollator`)."""

    def __init__(self, subpools: Sequence[SubPool], positions: np.ndarray):
        self.parts = list(subpools)
        self.where = []
        for p in np.asarray(positions, dtype=np.int64):
            found = [(k, int(np.searchsorted(part.positions, p))) for k, part in enumerate(self.parts)]
            found = [(k, j) for k, j in found if j < len(self.parts[k].positions) and self.parts[k].positions[j] == p]
            if not found:
                raise ValueError(f"pool row {int(p)} belongs to no sub-pool.")
            self.where.append(found[0])

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i: int) -> dict:
        k, j = self.where[i]
        row = self.parts[k].dataset[j]
        return {key: value for key, value in row.items() if key not in ("image", "index") and value is not None}


class MixedCollator:
    """Right-pads token columns (as feature extraction does) and stacks ``pixel_values`` of the rows that have one,
    which is what LLaVA-style models take for a batch mixing image and text-only rows."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict]) -> dict:
        batch = collate_rows({k: [r[k] for r in rows] for k in ("input_ids", "labels")}, self.pad_token_id,
                             self.max_length)
        pixels = [torch.as_tensor(r["pixel_values"]) for r in rows if "pixel_values" in r]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


class LogAtSave(TrainerCallback):
    """Log at every step that saves a checkpoint, so each checkpoint's ``trainer_state.json`` holds the learning
    rate of its step (read back by offline extraction to weight checkpoints)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


def training_arguments(recipe: Recipe, n_warmup: int) -> TrainingArguments:
    """The warmup's ``TrainingArguments``, with ``--num-checkpoints`` saves spread over the run."""
    w, cpu = recipe.warmup, on_cpu(recipe.warmup)
    training = TrainingArguments(
        output_dir=os.path.join(recipe.recipe.output_dir, "warmup"),
        per_device_train_batch_size=w.per_device_train_batch_size,
        gradient_accumulation_steps=w.gradient_accumulation_steps, num_train_epochs=w.num_train_epochs,
        max_steps=w.max_steps, learning_rate=w.learning_rate, lr_scheduler_type=w.lr_scheduler_type,
        warmup_steps=w.warmup_steps, weight_decay=w.weight_decay, logging_steps=w.logging_steps,
        save_strategy="steps", save_steps=1, bf16=w.bf16, gradient_checkpointing=w.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if w.gradient_checkpointing else None,
        remove_unused_columns=False, report_to="none", seed=w.seed, disable_tqdm=True, use_cpu=cpu,
        dataloader_pin_memory=not cpu,
        # A fully trained module (e.g. the projector) gets no gradient from a batch of text-only rows.
        ddp_find_unused_parameters=bool(recipe.lora.modules_to_save),
    )
    batches = math.ceil(n_warmup / (w.per_device_train_batch_size * training.world_size))
    per_epoch = max(1, math.ceil(batches / w.gradient_accumulation_steps))
    total = w.max_steps if w.max_steps > 0 else math.ceil(w.num_train_epochs * per_epoch)
    training.save_steps = max(1, math.ceil(total / w.num_checkpoints))
    logger.info("Warmup: %d rows, %d optimizer steps, a checkpoint every %d steps", n_warmup, total,
                training.save_steps)
    return training


def run_warmup(recipe: Recipe, model, subpools: Sequence[SubPool], tasks: Mapping):
    """LoRA warmup on a random ``--warmup-fraction`` of the pool, with :class:`IconsCallback` on the sub-pools
    (unless ``--no-features``); returns ``(train, tasks)`` store paths, or ``None`` without features."""
    n_pool = sum(len(p.positions) for p in subpools)
    n = max(1, math.floor(recipe.warmup.warmup_fraction * n_pool))
    warmup = WarmupRows(subpools, np.sort(np.random.default_rng(recipe.warmup.seed).choice(n_pool, n, replace=False)))
    model = attach_lora(model, recipe.lora, seed=recipe.warmup.seed,
                        gradient_checkpointing=recipe.warmup.gradient_checkpointing)
    callbacks = [LogAtSave()]
    if not recipe.recipe.no_features:
        callbacks.append(IconsCallback({p.name: p.dataset for p in subpools}, tasks,
                                       os.path.join(recipe.recipe.output_dir, "warmup", "icons"),
                                       settings=recipe.features))
    trainer = Trainer(model=model, args=training_arguments(recipe, len(warmup)), train_dataset=warmup,
                      data_collator=MixedCollator(recipe.features.pad_token_id, recipe.features.max_length),
                      callbacks=callbacks)
    sharded = [name for name, on in (("DeepSpeed", getattr(trainer, "is_deepspeed_enabled", False)),
                                     ("FSDP", getattr(trainer, "is_fsdp_enabled", False))) if on]
    if sharded and len(callbacks) > 1:
        raise RuntimeError(
            f"this run uses {sharded[0]}, where parameters or optimizer states are sharded across processes and the "
            "gradient features are not supported. Warm up with --no-features, then compute the features from the "
            "saved checkpoints with --checkpoints under the DDP or single-process config (--train-feature sgd unless "
            "the checkpoints hold a torch optimizer.pt); or warm up under the DDP config."
        )
    torch.manual_seed(recipe.warmup.seed)
    trainer.train()
    trainer.accelerator.wait_for_everyone()
    return callbacks[1].stores() if len(callbacks) > 1 else None


def pool_stores(recipe: Recipe, load_model: Callable[[], object], subpools: Sequence[SubPool], tasks: Mapping,
                state: PartialState):
    """``(train, tasks)`` store paths: from ``--checkpoints`` (every process computes its share of rows), or
    from a warmup with the callback; ``None`` after a ``--no-features`` warmup."""
    if not recipe.recipe.checkpoints:
        return run_warmup(recipe, load_model(), subpools, tasks)
    pool = {p.name: p.dataset for p in subpools}
    entries = []
    for checkpoint in recipe.recipe.checkpoints:
        if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
            raise FileNotFoundError(
                f"{checkpoint} has no adapter_config.json; pass checkpoint-N folders of a LoRA warmup."
            )
        model = PeftModel.from_pretrained(load_model(), checkpoint, is_trainable=True).to(state.device)
        entries.append(compute_checkpoint_stores(model, pool, tasks, os.path.join(recipe.recipe.output_dir, "icons"),
                                                 settings=recipe.features, checkpoint=checkpoint))
        del model
    state.wait_for_everyone()
    return run_stores(entries)


# ------------------------------------------------------------------------------------------------ selection


def pool_scores(recipe: Recipe, stores, subpools: Sequence[SubPool]):
    """One score table for the whole pool, its ``index`` at pool positions.

    The sub-pools' stores are scored together as the parts of one pool (percentile ranks and z-scores of the
    balanced specialists are taken over the whole pool); the parts' row numbers are then mapped to pool positions.
    """
    scores = compute_influence(*stores, settings=recipe.influence)
    positions = np.concatenate([p.positions for p in subpools]).astype(np.int64)
    if np.array_equal(positions, np.arange(len(positions))):
        return scores
    info = Provenance.of(scores)
    scores = scores.map(lambda batch: {"index": positions[np.asarray(batch["index"], dtype=np.int64)]},
                        batched=True, keep_in_memory=True, desc="pool positions").sort("index")
    influence = dict(info.influence or {})
    if influence.get("skipped"):
        influence["skipped"] = [{**row, "index": int(positions[row["index"]])} for row in influence["skipped"]]
    return dataclasses.replace(info, influence=influence).attach(scores)


def select_and_export(recipe: Recipe, scores, pool, *, pool_name: str | None = None, tags=()) -> str:
    """``select`` -> ``export_selection`` (-> ``push_selection``); returns the subset folder."""
    r = recipe.recipe
    selected = select(scores, settings=recipe.selection)
    subset_dir = export_selection(pool, selected, os.path.join(r.output_dir, "subset"), pool_name=pool_name,
                                  license=r.license, pretty_name=r.pretty_name, tags=[*tags, *r.tag])
    if r.push_to_hub:
        url = push_selection(subset_dir, r.push_to_hub, private=r.hub_private or None)
        logger.info("Pushed the subset to %s", url)
    with open(os.path.join(subset_dir, "selection.json")) as handle:
        meta = json.load(handle)
    logger.info("Selected %d of %d pool rows with method %r (fraction %s); subset, scores and dataset card in %s",
                meta["num_selected"], meta["pool"]["num_rows"], meta["selection"]["method"],
                meta["selection"]["fraction"], subset_dir)
    return subset_dir


__all__ = [
    "LoraArguments", "MixedCollator", "Recipe", "RecipeArguments", "SubPool", "TaskSpec", "WarmupArguments",
    "WarmupRows", "add_recipe_arguments", "load_rows", "parse_recipe_args",
    "parse_task_specs", "pool_scores", "pool_stores", "process_state", "select_and_export", "task_datasets",
    "with_pad_token",
]
