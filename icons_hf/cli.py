"""``icons-hf``: the ICONS pipeline from the command line.

Subcommands: ``demo``, ``gradients``, ``influence``, ``select``, ``export``, ``report``, ``push``. Each has
``--help``. ``gradients`` runs under ``accelerate launch``/``torchrun`` (every process takes its share of rows).

The options of ``gradients``, ``influence`` and ``select`` are generated from the fields of
:class:`~icons_hf.settings.FeatureSettings`, :class:`~icons_hf.settings.InfluenceSettings` and
:class:`~icons_hf.settings.SelectionSettings` (``batch_size`` -> ``--batch-size``), with their help text. An option
left out keeps the value of ``--preset`` (``default`` unless given); only the options given are passed on.

A mistake in the command or its inputs prints one line, ``icons-hf <command>: error: <what and how to fix it>``,
and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .features import FEATURE_TYPES
from .options import add_dataclass_options, given_options
from .settings import PRESETS, FeatureSettings, InfluenceSettings, SelectionSettings

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What the command line adds to a field's help.
_CLI_NOTES = {
    "threshold_percentile": "from the command line, --preset paper ties it to the fraction",
    "pad_token_id": "default: the model config's pad_token_id, else 0",
}


class UsageError(ValueError):
    """A mistake in the command line or its inputs (printed as one ``error:`` line, exit status 2)."""


# --------------------------------------------------------------------------------------------- options


def add_settings_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the settings dataclass ``cls`` (``--field-name``), default ``None`` (= not given:
    the preset's value), help from the field's metadata, plus ``--preset``."""
    group = add_dataclass_options(parser, cls, skip=skip, keep_defaults=False, notes=_CLI_NOTES,
                                  title=f"{cls.__name__} (left out: the --preset's value)")
    group.add_argument("--preset", choices=PRESETS,
                       help="named settings to start from: 'default' (the library's measured defaults) or 'paper' "
                            "(the released ICONS rule); options given override it (default: default)")


def stage_kwargs(args: argparse.Namespace, cls, *, skip: tuple[str, ...] = ()) -> dict:
    """The settings options that were given (not ``None``) and ``preset=`` when ``--preset`` was given: the keyword
    arguments for the stage's library call."""
    out = given_options(args, cls, skip=skip)
    if getattr(args, "preset", None) is not None:
        out["preset"] = args.preset
    return out


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the embedded easy-VQA demo end to end (CPU, offline)")
    p.add_argument("--output-dir", default="icons_demo", help="where the demo writes everything (default: %(default)s)")
    p.add_argument("--pool-size", type=int, default=3000,
                   help="pool rows drawn from easy-VQA train (default: %(default)s)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the pool to select (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the pool draw, the model and the warmup (default: %(default)s)")


# Fields of FeatureSettings that `gradients` takes otherwise: --feature chooses the feature of the dataset at hand.
_GRADIENTS_SKIP = ("train_feature",)


def _add_gradients(sub):
    p = sub.add_parser("gradients", help="per-example gradient features of a dataset at one checkpoint")
    p.add_argument("--model", required=True, help="base model folder or Hub id (loaded with from_pretrained)")
    p.add_argument("--adapter", help="LoRA adapter folder, e.g. a Trainer checkpoint-N (loaded trainable)")
    p.add_argument("--dataset", required=True,
                   help="a tokenized dataset saved with save_to_disk (input_ids, labels, ...) or LLaVA .json/.jsonl")
    p.add_argument("--image-folder", help="folder that LLaVA 'image' paths are relative to")
    p.add_argument("--output-dir", required=True, help="the gradient store to write (resumed if it exists)")
    p.add_argument("--feature", choices=FEATURE_TYPES, default="sgd", help="feature type of these rows (default: "
                   "%(default)s): " + "; ".join(f"{e.name!r} {e.description}" + (" (needs --optimizer-state)" if
                                                e.needs_optimizer_state else "") for e in FEATURE_TYPES.values()))
    p.add_argument("--optimizer-state", help="Trainer checkpoint folder with optimizer.pt (default: --adapter)")
    p.add_argument("--learning-rate", type=float, help="checkpoint learning rate (default: from trainer_state.json)")
    p.add_argument("--torch-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: %(default)s)")
    add_settings_options(p, FeatureSettings, skip=_GRADIENTS_SKIP)


def _add_influence(sub):
    p = sub.add_parser("influence", help="per-task influence scores from gradient stores")
    p.add_argument("--run", help="an IconsCallback output folder (icons_run.json); replaces --train/--task")
    p.add_argument("--train", nargs="+", help="train stores, one per checkpoint")
    p.add_argument("--task", action="append", default=[], metavar="NAME[/SUBTASK]=STORE[,STORE...]",
                   help="validation stores of a task (one per checkpoint, same order as --train); repeatable")
    p.add_argument("--work-dir", help="folder for the temporary per-example cosine file of balanced/zscore "
                                      "(4 x rows x validation examples bytes; default: the --cache-file's folder, "
                                      "else the system's temporary folder)")
    p.add_argument("--cache-file", help="write the score table to this Arrow file batch by batch (large pools)")
    p.add_argument("--output", required=True, help="new folder to save the score table in (datasets save_to_disk)")
    add_settings_options(p, InfluenceSettings)


def _add_select(sub):
    p = sub.add_parser("select", help="select rows from a score table")
    p.add_argument("scores", help="score table folder written by 'icons-hf influence'")
    p.add_argument("--output", required=True,
                   help="new folder to save the table with votes/selected columns in (not the scores folder)")
    add_settings_options(p, SelectionSettings)


def _add_export(sub):
    p = sub.add_parser("export", help="write the selected rows in the pool's format, with scores and a card")
    p.add_argument("--pool", required=True,
                   help="the pool the features were computed on, unchanged and in order: a .json/.jsonl records file "
                        "or a dataset folder saved with save_to_disk")
    p.add_argument("--scores", required=True, help="folder written by 'icons-hf select'")
    p.add_argument("--output-dir", required=True,
                   help="folder to write (new, empty, or a previous export; files the export did not write are never "
                        "replaced)")
    p.add_argument("--pool-name", help="name of the pool in the card (default: the file or folder name)")
    p.add_argument("--license", help="license of the subset for the card (default: other)")
    p.add_argument("--pretty-name", help="title of the card (default: '<pool>: ICONS selection of N rows')")
    p.add_argument("--tag", action="append", default=[], help="extra Hub tag; repeatable")


def _add_report(sub):
    p = sub.add_parser("report", help="figures and a Markdown report of an exported selection")
    p.add_argument("export_dir", help="folder written by 'icons-hf export'")
    p.add_argument("--output-dir", help="where to write report.md and the figures (default: <export_dir>/report)")
    p.add_argument("--group-column", help="record field or column to break the subset down by (e.g. source)")


def _add_push(sub):
    p = sub.add_parser("push", help="push an exported selection to the Hugging Face Hub as a dataset")
    p.add_argument("export_dir", help="folder written by 'icons-hf export'")
    p.add_argument("repo_id", help="dataset repository, 'namespace/name' (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--embed-images", action="store_true", help="embed images (datasets.Image) instead of paths")
    p.add_argument("--image-folder", help="folder the LLaVA image paths are relative to (with --embed-images)")
    p.add_argument("--no-scores", action="store_true", help="do not push the score table as the 'scores' config")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icons-hf", description="ICONS data selection on the Hugging Face stack.")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=_LOG_LEVELS,
                        help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_gradients, _add_influence, _add_select, _add_export, _add_report, _add_push):
        add(sub)
    return parser


# --------------------------------------------------------------------------------------------- inputs


def parse_tasks(specs: list[str]) -> dict:
    """``--task`` values (``NAME=STORE[,STORE...]`` or ``NAME/SUBTASK=...``) as the ``tasks`` of compute_influence."""
    tasks: dict = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise UsageError(f"--task {spec!r}: expected NAME=STORE[,STORE...] or NAME/SUBTASK=STORE[,...]")
        stores = paths.split(",")
        task, _, subtask = name.partition("/")
        if subtask:
            if isinstance(tasks.get(task), list):
                raise UsageError(f"--task {spec!r}: task {task!r} was given both with and without subtasks")
            tasks.setdefault(task, {})[subtask] = stores
        else:
            if task in tasks:
                raise UsageError(f"--task {spec!r}: task {task!r} was given twice; give each task once")
            tasks[task] = stores
    return tasks


def check_output(output: str, inputs, flag: str = "--output") -> None:
    """Refuse an output folder that is one of the inputs, inside one, or holds one (it would be written over)."""
    out = os.path.realpath(output)
    for given in inputs:
        if not given:
            continue
        path = os.path.realpath(given)
        if out == path or out.startswith(path + os.sep) or path.startswith(out + os.sep):
            where = "is" if out == path else "is inside" if out.startswith(path + os.sep) else "holds"
            raise UsageError(f"{flag} {output} {where} the input {given}; writing there would destroy what is being "
                             f"read. Pass a new folder as {flag}.")


def load_table(path: str, flag: str):
    """A score table folder (``save_to_disk``), or an error saying what to pass."""
    from datasets import Dataset, load_from_disk

    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is not a folder; pass the folder written by 'icons-hf influence' or "
                         "'icons-hf select'.")
    try:
        table = load_from_disk(path)
    except FileNotFoundError:
        table = None
    if not isinstance(table, Dataset):
        raise UsageError(f"{flag} {path} is not a score table saved by 'icons-hf influence' or 'icons-hf select'; pass "
                         "that folder.")
    return table


def _load_model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    dtype = getattr(torch, args.torch_dtype)
    config = AutoConfig.from_pretrained(args.model)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(args.model, dtype=dtype)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    return model, config


def _load_dataset(args, config):
    from datasets import load_from_disk

    if os.path.isdir(args.dataset):
        return load_from_disk(args.dataset)
    from transformers import AutoProcessor, AutoTokenizer

    from .data import prepare_llava_dataset

    if hasattr(config, "vision_config"):
        processor = AutoProcessor.from_pretrained(args.model)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        num_image_tokens = getattr(processor, "num_image_tokens", None) or getattr(config, "image_seq_length", 0)
        image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    else:
        tokenizer, image_processor = AutoTokenizer.from_pretrained(args.model), None
        num_image_tokens, image_token_id = 0, None
    return prepare_llava_dataset(
        args.dataset, tokenizer, image_processor=image_processor, image_folder=args.image_folder,
        image_token_id=image_token_id, num_image_tokens=num_image_tokens,
    )


# --------------------------------------------------------------------------------------------- commands


def _gradients(args) -> None:
    from .distributed import init_distributed, is_main_process
    from .gradients import compute_gradients

    needs_state = FEATURE_TYPES[args.feature].needs_optimizer_state
    if needs_state and not (args.optimizer_state or args.adapter):
        raise UsageError(f"--feature {args.feature} needs the checkpoint's optimizer state: pass --optimizer-state (or "
                         "--adapter) a Trainer checkpoint folder with optimizer.pt")
    check_output(args.output_dir, [args.dataset], "--output-dir")
    init_distributed()
    model, config = _load_model(args)
    dataset = _load_dataset(args, config)
    kwargs = stage_kwargs(args, FeatureSettings, skip=_GRADIENTS_SKIP)
    kwargs.setdefault("pad_token_id", getattr(config, "pad_token_id", None) or 0)
    state = args.optimizer_state or (args.adapter if needs_state else None)
    path = compute_gradients(
        model, dataset, output_dir=args.output_dir, feature=args.feature, optimizer_state=state,
        learning_rate=args.learning_rate,
        checkpoint=os.path.basename(os.path.normpath(args.adapter)) if args.adapter else None, **kwargs,
    )
    if is_main_process():
        print(path)


def _influence(args) -> None:
    from .callback import load_run
    from .influence import compute_influence

    if args.run and (args.train or args.task):
        raise UsageError("pass either --run DIR or --train STORE... --task NAME=STORE..., not both")
    if args.run:
        train, tasks = load_run(args.run)
        inputs = [args.run]
    elif args.train and args.task:
        train, tasks = args.train, parse_tasks(args.task)
        inputs = [*args.train, *(p for spec in args.task for p in spec.partition("=")[2].split(","))]
    else:
        raise UsageError("no gradient stores given: pass --run DIR (an IconsCallback output folder), or --train "
                         "STORE... (one per checkpoint) with at least one --task NAME=STORE[,STORE...]")
    check_output(args.output, inputs)
    scores = compute_influence(train, tasks, cache_file_name=args.cache_file, work_dir=args.work_dir,
                               **stage_kwargs(args, InfluenceSettings))
    scores.save_to_disk(args.output)
    print(args.output)


def _select(args) -> None:
    from .consensus import select
    from .provenance import provenance

    if args.num_rows is not None and args.fraction is not None:
        raise UsageError("pass either --fraction or --num-rows (the subset's size), not both")
    check_output(args.output, [args.scores])
    scores = select(load_table(args.scores, "the scores folder"), **stage_kwargs(args, SelectionSettings))
    scores.save_to_disk(args.output)
    info = provenance(scores)["selection"]
    print(f"selected {info['num_selected']} of {info['num_candidates']} rows -> {args.output}")


def _export(args) -> None:
    from .export import export_selection
    from .provenance import provenance

    check_output(args.output_dir, [args.scores, args.pool], "--output-dir")
    table = load_table(args.scores, "--scores")
    if "selection" not in provenance(table) or "selected" not in table.column_names:
        raise UsageError(f"--scores {args.scores} holds influence scores without a selection; run 'icons-hf select "
                         f"{args.scores} --output SELECTED' first and pass --scores SELECTED")
    print(export_selection(args.pool, table, args.output_dir, pool_name=args.pool_name,
                           license=args.license, pretty_name=args.pretty_name, tags=args.tag))


def _run(args) -> None:
    if args.command == "demo":
        from .demo import DemoConfig, format_summary, run_demo

        config = DemoConfig(output_dir=args.output_dir, pool_size=args.pool_size, fraction=args.fraction,
                            seed=args.seed)
        summary = run_demo(config)
        print(format_summary(summary))
    elif args.command == "gradients":
        _gradients(args)
    elif args.command == "influence":
        _influence(args)
    elif args.command == "select":
        _select(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "report":
        from .report import write_report

        print(write_report(args.export_dir, args.output_dir, group_column=args.group_column))
    elif args.command == "push":
        from .hub import push_selection

        print(push_selection(args.export_dir, args.repo_id, private=args.private or None, revision=args.revision,
                             create_pr=args.create_pr, embed_images=args.embed_images, image_folder=args.image_folder,
                             push_scores=not args.no_scores))


# Errors that are the user's to fix (each library message names the argument/row/file and the fix).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _run(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"icons-hf {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
