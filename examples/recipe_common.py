"""Pieces shared by the ICONS example scripts (``llava/icons_llava.py`` and ``text/icons_text.py``).

Both scripts run the same recipe; only the model class and the row format differ:

1. warm up: LoRA on a random ``--warmup-fraction`` of the pool with ``transformers.Trainer`` and
   :class:`icons_hf.IconsCallback`, which writes gradient features of the pool and of every target task's
   validation rows at each checkpoint; or, with ``--checkpoints``, compute the same features from checkpoints
   saved earlier (``--no-features`` runs, another sharded setup, or an earlier warmup);
2. ``compute_influence`` -> ``select`` -> ``export_selection``, and ``push_selection`` with ``--push-to-hub``.

A pool may be split into sub-pools that are batched separately (LLaVA-665K mixes image and text-only rows);
each keeps the pool positions of its rows, and their score tables are merged into one before selection, so the
selection and the export always refer to positions in the original pool.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("icons_example")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
HUB_PREFIX = "hub:"


@dataclass
class SubPool:
    """Formatted rows of one part of the pool, and the pool positions of those rows (ascending)."""

    name: str
    dataset: object
    positions: np.ndarray


@dataclass
class TaskSpec:
    task: str
    subtask: str | None
    source: str
    image_folder: str | None


# ----------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help when there is one to show (not None, False or empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def add_common_arguments(parser: argparse.ArgumentParser, *, lora_targets: list[str] | None, lora_regex: str | None,
                         learning_rate: float) -> None:
    """Argument groups shared by the example scripts (the model and data arguments are the scripts' own)."""
    from icons_hf import METHODS
    from icons_hf.gradients import ADAM_VARIANTS, FEATURES, PROJECTIONS
    from icons_hf.influence import SPECIALISTS

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True,
                     help="where checkpoints (warmup/), gradient features (warmup/icons/) and the subset (subset/) go")
    out.add_argument("--license", default=None, help="license of the subset for the dataset card (the pool's license)")
    out.add_argument("--pretty-name", default=None, help="title of the dataset card")
    out.add_argument("--tag", action="append", default=[], help="extra Hub tag for the card; repeatable")
    out.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                     help="push the exported subset to this Hub dataset repository (icons_hf.hub.push_selection)")
    out.add_argument("--hub-private", action="store_true", help="create the Hub repository as private")

    tasks = parser.add_argument_group("target tasks")
    tasks.add_argument(
        "--task", action="append", default=[], metavar="NAME[/SUBTASK]=SOURCE[:IMAGE_FOLDER]",
        help="a target task's validation rows; repeatable. SOURCE: a .json/.jsonl file, a folder written by "
             "Dataset.save_to_disk, or hub:REPO_ID[@SPLIT] (default split: validation). NAME/SUBTASK entries form "
             "one task scored as the max over its subtasks (MME-style).")
    tasks.add_argument("--max-validation-rows", type=int, default=None,
                       help="keep at most this many validation rows per (sub)task, drawn with --seed")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=128, help="LoRA rank (as ICONS/LESS)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 * r, as ICONS)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    lora.add_argument("--lora-target-modules", nargs="+", default=lora_targets,
                      help="names of the modules to adapt (peft suffix match)")
    lora.add_argument("--lora-target-regex", default=lora_regex,
                      help="a regular expression (peft full match) of the module names to adapt, instead of "
                           "--lora-target-modules")
    parser.set_defaults(default_lora_targets=lora_targets, default_lora_regex=lora_regex)
    lora.add_argument("--modules-to-save", nargs="*", default=[],
                      help="modules trained in full beside the adapters (e.g. multi_modal_projector)")

    warm = parser.add_argument_group("warmup training")
    warm.add_argument("--warmup-fraction", type=float, default=0.05,
                      help="share of the pool drawn at random (with --seed) for the warmup (as LESS)")
    warm.add_argument("--num-train-epochs", type=float, default=1.0, help="warmup epochs over the warmup sample")
    warm.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides epochs)")
    warm.add_argument("--num-checkpoints", type=int, default=4,
                      help="checkpoints to extract features at, spread evenly over the run (as LESS)")
    warm.add_argument("--per-device-train-batch-size", type=int, default=4, help="warmup rows per process and step")
    warm.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    warm.add_argument("--learning-rate", type=float, default=learning_rate, help="peak learning rate of the warmup")
    warm.add_argument("--lr-scheduler-type", default="linear", help="transformers scheduler name")
    warm.add_argument("--warmup-steps", type=float, default=0.03,
                      help="learning-rate warmup: steps, or a ratio of the run if below 1")
    warm.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    warm.add_argument("--logging-steps", type=int, default=10, help="log the loss every this many steps (and at every save)")
    warm.add_argument("--bf16", action="store_true", help="train with bfloat16 autocast (GPUs)")
    warm.add_argument("--use-cpu", action="store_true",
                      help="run on the CPU even where a GPU is present (implied when there is none)")
    warm.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the warmup backward pass")
    warm.add_argument("--max-length", type=int, default=None,
                      help="truncate rows to this many tokens in training and feature extraction (recorded)")
    warm.add_argument("--seed", type=int, default=0, help="seed of the warmup sample, training and validation subsample")

    feat = parser.add_argument_group("gradient features")
    feat.add_argument("--train-feature", choices=FEATURES, default=None,
                      help="pool-side feature (default: the library's, see icons_hf.IconsCallback)")
    feat.add_argument("--adam-variant", choices=ADAM_VARIANTS, default=None, help="Adam feature map (default: the library's)")
    feat.add_argument("--projection", choices=PROJECTIONS, default=None, help="random projection (default: the library's)")
    feat.add_argument("--dim", type=int, default=None, help="projected dimension (default: the library's, 8192 as LESS)")
    feat.add_argument("--projection-seed", type=int, default=0, help="seed of the random projection")
    feat.add_argument("--feature-batch-size", type=int, default=8, help="rows per forward/backward in extraction")
    feat.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16", help="storage dtype of the features")
    feat.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                      help="'skip' records and leaves out pool rows that give no feature (no supervised token, ...)")
    feat.add_argument("--no-features", action="store_true",
                      help="only warm up and save checkpoints (for ZeRO-3/FSDP runs); extract later with --checkpoints")
    feat.add_argument("--checkpoints", nargs="+", default=None, metavar="CHECKPOINT_DIR",
                      help="skip the warmup: compute features from these saved Trainer checkpoints (LoRA adapter, and "
                           "optimizer.pt for --train-feature adam), in training order")

    sel = parser.add_argument_group("selection")
    sel.add_argument("--method", choices=METHODS, default="vote", help="consensus method")
    sel.add_argument("--fraction", type=float, default=0.2, help="share of the pool to keep")
    sel.add_argument("--threshold-percentile", type=float, default=80.0, help="per-task vote threshold (percentile of its scores)")
    sel.add_argument("--select-task", default=None, help="the task for --method task")
    sel.add_argument("--selection-seed", type=int, default=0, help="seed for --method random")
    sel.add_argument("--specialist", choices=SPECIALISTS, default="balanced",
                     help="how a task's validation examples combine (default balanced; mean is the ICONS paper's)")
    sel.add_argument("--task-floor", type=float, default=None,
                     help="share of the subset reserved as equal per-task floors (default 1.0 for vote, 0 otherwise; "
                          "0 with vote is the ICONS paper's rule)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.task:
        parser.error("give at least one target task with --task NAME=SOURCE")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction} must be in (0, 1]")
    if args.checkpoints is None and not 0 < args.warmup_fraction <= 1:
        parser.error(f"--warmup-fraction {args.warmup_fraction} must be in (0, 1]")
    if args.num_checkpoints < 1:
        parser.error("--num-checkpoints must be at least 1")
    if args.checkpoints and args.no_features:
        parser.error("--checkpoints computes features from saved checkpoints; it cannot be combined with --no-features")
    if args.method == "task" and not args.select_task:
        parser.error("--method task needs --select-task NAME")
    # The option given on the command line replaces the script's default of the other one.
    modules_given = args.lora_target_modules != args.default_lora_targets
    regex_given = args.lora_target_regex != args.default_lora_regex
    if modules_given and regex_given:
        parser.error("give --lora-target-modules or --lora-target-regex, not both")
    if modules_given:
        args.lora_target_regex = None
    elif regex_given:
        args.lora_target_modules = None
    for path in args.checkpoints or []:
        if not os.path.isdir(path):
            parser.error(f"--checkpoints: {path} is not a folder; pass Trainer checkpoint-N folders")
    try:
        args.task_specs = parse_task_specs(args.task)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def parse_task_specs(specs: list[str]) -> list[TaskSpec]:
    """``NAME[/SUBTASK]=SOURCE[:IMAGE_FOLDER]`` strings as task specifications (see ``--task``)."""
    out, seen = [], set()
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--task {spec!r}: expected NAME=SOURCE, e.g. --task vqa=vqa_val.json:images")
        task, _, sub = name.partition("/")
        for part in (task, sub) if sub else (task,):
            if not _NAME.match(part):
                raise ValueError(f"--task {spec!r}: {part!r} may only use letters, digits, '_', '.', '-'.")
        if (task, sub) in seen:
            raise ValueError(f"--task {spec!r}: {name} is given twice.")
        seen.add((task, sub))
        folder = None
        if value.startswith(HUB_PREFIX):
            rest = value[len(HUB_PREFIX):]
            repo, colon, folder = rest.partition(":")
            source, folder = HUB_PREFIX + repo, (folder or None) if colon else None
        elif os.path.exists(value):
            source = value
        elif ":" in value:
            source, folder = value.rsplit(":", 1)
        else:
            source = value
        if not source.startswith(HUB_PREFIX) and not os.path.exists(source):
            raise FileNotFoundError(f"--task {spec!r}: {source} does not exist (expected a .json/.jsonl file, a "
                                    "save_to_disk folder or hub:REPO_ID[@SPLIT]).")
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"--task {spec!r}: image folder {folder} does not exist.")
        out.append(TaskSpec(task, sub or None, source, folder))
    subtasked = {s.task for s in out if s.subtask}
    plain = {s.task for s in out if not s.subtask}
    if subtasked & plain:
        raise ValueError(f"task {sorted(subtasked & plain)[0]!r} is given both with and without a /SUBTASK.")
    return out


def load_rows(source: str, *, what: str):
    """Rows of a ``.json``/``.jsonl`` file (a list of dicts), a ``save_to_disk`` folder or ``hub:REPO[@SPLIT]``."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from icons_hf.export import load_llava_records

    if source.startswith(HUB_PREFIX):
        repo, _, split = source[len(HUB_PREFIX):].partition("@")
        return load_dataset(repo, split=split or "validation")
    if os.path.isdir(source):
        data = load_from_disk(source)
        if isinstance(data, DatasetDict):
            raise ValueError(f"{what} {source} holds several splits ({', '.join(data)}); pass the folder of one split.")
        return data
    if source.endswith((".json", ".jsonl")):
        return load_llava_records(source)
    raise ValueError(f"{what} {source}: expected a .json/.jsonl file, a save_to_disk folder or hub:REPO_ID[@SPLIT].")


def subsample(rows, limit: int | None, seed: int):
    """At most ``limit`` rows, drawn without replacement with ``seed`` (kept in their order)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return rows.select(keep.tolist()) if hasattr(rows, "select") else [rows[int(i)] for i in keep]


def nest_tasks(specs: list[TaskSpec], datasets: list) -> dict:
    """``task -> Dataset`` or ``task -> {subtask -> Dataset}`` as IconsCallback and compute_gradients take them."""
    tasks: dict = {}
    for spec, data in zip(specs, datasets):
        if spec.subtask:
            tasks.setdefault(spec.task, {})[spec.subtask] = data
        else:
            tasks[spec.task] = data
    return tasks


# -------------------------------------------------------------------------------------------------- processes


def on_cpu(args) -> bool:
    """Whether to run on the CPU: asked for, or no GPU (CUDA, XPU, MPS) is present."""
    import torch

    if args.use_cpu:
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or (mps is not None and mps.is_available()))


def process_state(args):
    """The accelerate process state of this run. Processes started by ``accelerate launch``/``torchrun`` on a
    machine without GPUs join one CPU process group (gloo) instead of each running alone."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu(args))


def start(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse and check the arguments, join the process group, and set up logging (main process at INFO)."""
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    state = process_state(args)
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, state


def check_process_count(num_processes: int) -> None:
    """Refuse a run whose launcher started several processes that did not join one group (each would train
    and select alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but this one runs in a group of {num_processes}; check that "
            "the accelerate config matches the machine (a GPU config on a machine without GPUs needs --use-cpu)."
        )


# ---------------------------------------------------------------------------------------------------- model


def attach_lora(model, args):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(args.seed)  # the same adapter initialisation in every process and every run
    targets = args.lora_target_regex or list(args.lora_target_modules)
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout, target_modules=targets, modules_to_save=list(args.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_adapter(base, checkpoint: str):
    """``base`` with the (trainable) LoRA adapter of a Trainer checkpoint."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        raise FileNotFoundError(f"{checkpoint} has no adapter_config.json; pass checkpoint-N folders of a LoRA warmup.")
    return PeftModel.from_pretrained(base, checkpoint, is_trainable=True)


def feature_options(args, pad_token_id: int) -> dict:
    """Options for IconsCallback/compute_gradients; unset ones keep the library's defaults."""
    options = dict(seed=args.projection_seed, batch_size=args.feature_batch_size, dtype=args.feature_dtype,
                   on_bad_row=args.on_bad_row, max_length=args.max_length, pad_token_id=pad_token_id)
    for key in ("adam_variant", "projection", "dim"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def train_feature(args) -> str:
    if args.train_feature is not None:
        return args.train_feature
    from icons_hf import IconsCallback

    return inspect.signature(IconsCallback).parameters["train_feature"].default


# --------------------------------------------------------------------------------------------------- warmup


def warmup_positions(n_pool: int, fraction: float, seed: int) -> np.ndarray:
    """Pool positions of the warmup sample: ``max(1, floor(fraction * n_pool))`` rows, ascending."""
    n = max(1, math.floor(fraction * n_pool))
    return np.sort(np.random.default_rng(seed).choice(n_pool, n, replace=False))


class WarmupRows:
    """The warmup sample as a map-style dataset over the sub-pools' formatted rows (images load lazily).

    Rows of different sub-pools may share a batch: :class:`MixedCollator` stacks the ``pixel_values`` of the
    rows that have an image, which is what LLaVA-style models take for a batch mixing image and text-only rows.
    """

    def __init__(self, subpools: list[SubPool], positions: np.ndarray):
        self.parts = [(part, part.positions) for part in subpools]
        self.where = []
        for p in np.asarray(positions, dtype=np.int64):
            for k, (part, pos) in enumerate(self.parts):
                j = int(np.searchsorted(pos, p))
                if j < len(pos) and pos[j] == p:
                    self.where.append((k, j))
                    break
            else:
                raise ValueError(f"pool row {int(p)} belongs to no sub-pool.")

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i: int) -> dict:
        k, j = self.where[i]
        row = self.parts[k][0].dataset[j]
        return {key: value for key, value in row.items() if key not in ("image", "index") and value is not None}


class MixedCollator:
    """Right-pads token columns (as feature extraction does) and stacks ``pixel_values`` of the rows that have one."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        from icons_hf.gradients.extractor import collate_rows

        batch = collate_rows({k: [r[k] for r in rows] for k in ("input_ids", "labels")}, self.pad_token_id,
                             self.max_length)
        pixels = [torch.as_tensor(r["pixel_values"]) for r in rows if "pixel_values" in r]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


class LogAtSave:
    """Trainer callback: log at every step that saves a checkpoint, so each checkpoint's ``trainer_state.json``
    holds the learning rate of its step (read back by offline extraction to weight checkpoints)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _LogAtSave(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if control.should_save:
                    control.should_log = True
                return control

        return _LogAtSave()


def training_arguments(args, n_warmup: int):
    from transformers import TrainingArguments

    training = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "warmup"),
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=1,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        use_cpu=on_cpu(args),
        dataloader_pin_memory=not on_cpu(args),
        # A fully trained module (e.g. the projector) gets no gradient from a batch of text-only rows.
        ddp_find_unused_parameters=bool(args.modules_to_save),
    )
    # Spread --num-checkpoints saves over the run (the Trainer also saves at the last step).
    batches = math.ceil(n_warmup / (args.per_device_train_batch_size * training.world_size))
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    training.save_steps = max(1, math.ceil(total / args.num_checkpoints))
    logger.info("Warmup: %d rows, %d optimizer steps, a checkpoint every %d steps", n_warmup, total, training.save_steps)
    return training


def run_warmup(args, model, warmup, collator, subpools: list[SubPool], tasks: Mapping, pad_token_id: int):
    """Train on ``warmup`` with one IconsCallback per sub-pool; ``{sub-pool name: (train_paths, tasks)}``."""
    import torch
    from transformers import Trainer

    from icons_hf import IconsCallback

    training = training_arguments(args, len(warmup))
    callbacks = {}
    if not args.no_features:
        for part in subpools:
            callbacks[part.name] = IconsCallback(
                part.dataset, tasks, os.path.join(args.output_dir, "warmup", "icons", part.name),
                train_feature=train_feature(args), **feature_options(args, pad_token_id),
            )
    trainer = Trainer(model=model, args=training, train_dataset=warmup, data_collator=collator,
                      callbacks=[LogAtSave(), *callbacks.values()])
    check_process_count(trainer.accelerator.num_processes)
    sharded = [name for name, on in (("DeepSpeed", getattr(trainer, "is_deepspeed_enabled", False)),
                                     ("FSDP", getattr(trainer, "is_fsdp_enabled", False))) if on]
    if sharded and callbacks:
        raise RuntimeError(
            f"this run uses {sharded[0]}, where parameters or optimizer states are sharded across processes and the "
            "gradient features are not supported. Warm up with --no-features, then compute the features from the "
            "saved checkpoints with --checkpoints under the DDP or single-process config (--train-feature sgd unless "
            "the checkpoints hold a torch optimizer.pt); or warm up under the DDP config."
        )
    torch.manual_seed(args.seed)
    trainer.train()
    trainer.accelerator.wait_for_everyone()
    if not callbacks:
        return {}, trainer
    return {name: cb.stores() for name, cb in callbacks.items()}, trainer


def extract_from_checkpoints(args, load_base: Callable[[], object], subpools: list[SubPool], tasks: Mapping,
                             pad_token_id: int):
    """Gradient features at saved checkpoints (every process takes its share of rows); same layout as the
    callback's. Returns ``{sub-pool name: (train_paths, tasks)}``."""
    from icons_hf import compute_gradients
    from icons_hf.gradients.precondition import checkpoint_learning_rate

    state = process_state(args)
    check_process_count(state.num_processes)
    feature = train_feature(args)
    options = feature_options(args, pad_token_id)
    out = {part.name: ([], {}) for part in subpools}
    for checkpoint in args.checkpoints:
        name = os.path.basename(os.path.normpath(checkpoint))
        model = load_adapter(load_base(), checkpoint).to(state.device)
        lr = checkpoint_learning_rate(checkpoint)
        common = dict(options, learning_rate=lr, checkpoint=name)
        for part in subpools:
            root = os.path.join(args.output_dir, "icons", part.name, name)
            train_paths, task_paths = out[part.name]
            train_paths.append(compute_gradients(
                model, part.dataset, output_dir=os.path.join(root, "train"), feature=feature,
                optimizer_state=checkpoint if feature == "adam" else None, **common,
            ))
            for task, spec in tasks.items():
                subs = spec if isinstance(spec, Mapping) else {None: spec}
                for sub, data in subs.items():
                    path = compute_gradients(model, data, output_dir=os.path.join(root, task, *([sub] if sub else [])),
                                             feature="sgd", **common)
                    if sub is None:
                        task_paths.setdefault(task, []).append(path)
                    else:
                        task_paths.setdefault(task, {}).setdefault(sub, []).append(path)
        del model
    state.wait_for_everyone()
    return out


# ------------------------------------------------------------------------------------------------ selection


def influence_for_pool(stores: Mapping, subpools: list[SubPool], n_pool: int, specialist: str = "balanced"):
    """One score table for the whole pool, its rows at pool positions.

    Sub-pools (e.g. image and text-only rows) share the model, checkpoints and projection, so their stores are
    scored together as the parts of one pool (percentile ranks and z-scores of the balanced specialists are taken
    over the whole pool); the parts' row indices are then mapped to pool positions.
    """
    from icons_hf import compute_influence
    from icons_hf.influence import provenance

    first = stores[subpools[0].name]
    n_ckpt = len(first[0])
    train = [[stores[part.name][0][c] for part in subpools] for c in range(n_ckpt)]
    scores = compute_influence(train, first[1], specialist=specialist)
    info = provenance(scores)["influence"]
    positions = np.concatenate([part.positions for part in subpools]).astype(np.int64)
    scores = scores.map(lambda batch: {"index": positions[np.asarray(batch["index"], dtype=np.int64)]},
                        batched=True, keep_in_memory=True, desc="pool positions")
    if len(subpools) > 1:
        scores = scores.sort("index")
    info["skipped"] = [{**s, "index": int(positions[s["index"]])} for s in info.get("skipped", [])]
    info["sub_pools"] = {part.name: int(len(part.positions)) for part in subpools}
    info["pool_rows"] = int(n_pool)
    scores.info.description = json.dumps({"influence": info})
    return scores


def pool_scores(args, load_model: Callable[[], object], subpools: list[SubPool], tasks: Mapping, pad_token_id: int,
                n_pool: int):
    """Features (from ``--checkpoints``, or a warmup with the callback) and the pool's score table; ``None`` on
    the processes other than the main one, and after a ``--no-features`` warmup."""
    if args.checkpoints:
        stores = extract_from_checkpoints(args, load_model, subpools, tasks, pad_token_id)
    else:
        model = attach_lora(load_model(), args)
        warmup = WarmupRows(subpools, warmup_positions(n_pool, args.warmup_fraction, args.seed))
        stores, _ = run_warmup(args, model, warmup, MixedCollator(pad_token_id, args.max_length), subpools, tasks,
                               pad_token_id)
        if args.no_features:
            if process_state(args).is_main_process:
                print(f"Warmup checkpoints in {os.path.join(args.output_dir, 'warmup')}; compute the features with "
                      "--checkpoints under the DDP or single-process config.")
            return None
    if not process_state(args).is_main_process:
        return None
    return influence_for_pool(stores, subpools, n_pool, specialist=args.specialist)


def select_and_export(args, scores, pool, *, pool_name: str | None = None, tags=()) -> str:
    """``select`` -> ``export_selection`` (-> ``push_selection``); returns the subset folder."""
    from icons_hf import export_selection, select

    selected = select(scores, fraction=args.fraction, threshold_percentile=args.threshold_percentile,
                      method=args.method, task=args.select_task, seed=args.selection_seed, task_floor=args.task_floor)
    subset_dir = export_selection(pool, selected, os.path.join(args.output_dir, "subset"), pool_name=pool_name,
                                  license=args.license, pretty_name=args.pretty_name, tags=[*tags, *args.tag])
    if args.push_to_hub:
        from icons_hf.hub import push_selection

        url = push_selection(subset_dir, args.push_to_hub, private=args.hub_private or None)
        print(f"Pushed the subset to {url}")
    return subset_dir


def summarize(subset_dir: str) -> str:
    with open(os.path.join(subset_dir, "selection.json")) as handle:
        meta = json.load(handle)
    sel = meta["selection"]
    return (f"Selected {meta['num_selected']} of {meta['pool']['num_rows']} pool rows with method {sel['method']!r} "
            f"(fraction {sel['fraction']}); subset, scores and dataset card in {subset_dir}")
