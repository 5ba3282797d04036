"""``icons-hf``: the ICONS pipeline from the command line.

Subcommands: ``demo``, ``gradients``, ``influence``, ``select``, ``export``, ``report``, ``push``. Each has
``--help``. ``gradients`` runs under ``accelerate launch``/``torchrun`` (every process takes its share of rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .consensus import METHODS
from .gradients import ADAM_VARIANTS, FEATURES, PROJECTIONS
from .influence import SPECIALISTS


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the embedded easy-VQA demo end to end (CPU, offline)")
    p.add_argument("--output-dir", default="icons_demo", help="where the demo writes everything (default: %(default)s)")
    p.add_argument("--pool-size", type=int, default=3000, help="pool rows drawn from easy-VQA train (default: %(default)s)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the pool to select (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _add_gradients(sub):
    p = sub.add_parser("gradients", help="per-example gradient features of a dataset at one checkpoint")
    p.add_argument("--model", required=True, help="base model folder or Hub id (loaded with from_pretrained)")
    p.add_argument("--adapter", help="LoRA adapter folder, e.g. a Trainer checkpoint-N (loaded trainable)")
    p.add_argument("--dataset", required=True,
                   help="a tokenized dataset saved with save_to_disk (input_ids, labels, ...) or LLaVA .json/.jsonl")
    p.add_argument("--image-folder", help="folder that LLaVA 'image' paths are relative to")
    p.add_argument("--output-dir", required=True, help="the gradient store to write (resumed if it exists)")
    p.add_argument("--feature", choices=FEATURES, default="sgd",
                   help="'adam' for pool rows (needs --optimizer-state), 'sgd' for validation rows (default)")
    p.add_argument("--optimizer-state", help="Trainer checkpoint folder with optimizer.pt (default: --adapter)")
    p.add_argument("--adam-variant", choices=ADAM_VARIANTS, default="less")
    p.add_argument("--projection", choices=PROJECTIONS, default="countsketch")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="feature storage dtype")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    p.add_argument("--max-length", type=int, help="truncate longer rows (recorded in the store)")
    p.add_argument("--learning-rate", type=float, help="checkpoint learning rate (default: from trainer_state.json)")
    p.add_argument("--torch-dtype", default="float32", help="model dtype: float32, bfloat16 or float16")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="rows per shard: the unit of resumption and of work split between processes")
    p.add_argument("--max-tokens-per-batch", type=int, help="cap on padded tokens per batch (rows are length-bucketed)")


def _add_influence(sub):
    p = sub.add_parser("influence", help="per-task influence scores from gradient stores")
    p.add_argument("--run", help="an IconsCallback output folder (icons_run.json); replaces --train/--task")
    p.add_argument("--train", nargs="+", help="train stores, one per checkpoint")
    p.add_argument("--task", action="append", default=[], metavar="NAME[/SUBTASK]=STORE[,STORE...]",
                   help="validation stores of a task (one per checkpoint, same order as --train); repeatable")
    p.add_argument("--checkpoint-weights", type=float, nargs="+", help="explicit checkpoint weights")
    p.add_argument("--batch-size", type=int, default=4096, help="train rows read per step")
    p.add_argument("--specialist", choices=SPECIALISTS, default="balanced",
                   help="how a task's validation examples combine: balanced (default; an equal quota of top rows per "
                        "example), zscore, or mean (the ICONS paper's mean cosine)")
    p.add_argument("--work-dir", help="folder for the temporary per-example cosine file of balanced/zscore "
                                      "(4 x rows x validation examples bytes; default: the --cache-file's folder, "
                                      "else the system's temporary folder)")
    p.add_argument("--cache-file", help="write the score table to this Arrow file batch by batch (large pools)")
    p.add_argument("--output", required=True, help="folder to save the score table (datasets save_to_disk)")


def _add_select(sub):
    p = sub.add_parser("select", help="select rows from a score table")
    p.add_argument("scores", help="score table folder written by 'icons-hf influence'")
    p.add_argument("--method", choices=METHODS, default="vote")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--num-rows", type=int, help="select exactly this many rows instead of a fraction")
    p.add_argument("--threshold-percentile", type=float, default=80.0)
    p.add_argument("--task", help="the task for --method task")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--task-floor", type=float,
                   help="share of the subset reserved as equal per-task floors of each task's top rows (default: 1.0 "
                        "for vote, 0 otherwise; 0 with vote is the ICONS paper's rule)")
    p.add_argument("--output", required=True, help="folder to save the table with votes/selected columns")


def _add_export(sub):
    p = sub.add_parser("export", help="write the selected rows in the pool's format, with scores and a card")
    p.add_argument("--pool", required=True, help="LLaVA .json/.jsonl, or a dataset folder saved with save_to_disk")
    p.add_argument("--scores", required=True, help="folder written by 'icons-hf select'")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--license", help="license of the subset for the card (default: other)")
    p.add_argument("--pretty-name")
    p.add_argument("--tag", action="append", default=[], help="extra Hub tag; repeatable")


def _add_report(sub):
    p = sub.add_parser("report", help="figures and a Markdown report of an exported selection")
    p.add_argument("export_dir")
    p.add_argument("--output-dir", help="default: <export_dir>/report")
    p.add_argument("--group-column", help="record field or column to break the subset down by (e.g. source)")


def _add_push(sub):
    p = sub.add_parser("push", help="push an exported selection to the Hugging Face Hub as a dataset")
    p.add_argument("export_dir")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--embed-images", action="store_true", help="embed images (datasets.Image) instead of paths")
    p.add_argument("--image-folder", help="folder the LLaVA image paths are relative to (with --embed-images)")
    p.add_argument("--no-scores", action="store_true", help="do not push the score table as the 'scores' config")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icons-hf", description="ICONS data selection on the Hugging Face stack.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_gradients, _add_influence, _add_select, _add_export, _add_report, _add_push):
        add(sub)
    return parser


def _parse_tasks(specs: list[str]) -> dict:
    tasks: dict = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise SystemExit(f"--task {spec!r}: expected NAME=STORE[,STORE...] or NAME/SUBTASK=STORE[,...]")
        stores = paths.split(",")
        task, _, subtask = name.partition("/")
        if subtask:
            if isinstance(tasks.get(task), list):
                raise SystemExit(f"--task {spec!r}: task {task!r} was given both with and without subtasks")
            tasks.setdefault(task, {})[subtask] = stores
        else:
            if task in tasks:
                raise SystemExit(f"--task {spec!r}: task {task!r} was given twice")
            tasks[task] = stores
    return tasks


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


def _load_dataset(args, model, config):
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
        tokenizer, image_processor, num_image_tokens, image_token_id = AutoTokenizer.from_pretrained(args.model), None, 0, None
    return prepare_llava_dataset(
        args.dataset, tokenizer, image_processor=image_processor, image_folder=args.image_folder,
        image_token_id=image_token_id, num_image_tokens=num_image_tokens,
    )


def _run(args) -> int:
    if args.command == "demo":
        from .demo import DemoConfig, format_summary, run_demo

        summary = run_demo(DemoConfig(output_dir=args.output_dir, pool_size=args.pool_size, fraction=args.fraction, seed=args.seed))
        print(format_summary(summary))
    elif args.command == "gradients":
        from .distributed import init_distributed, is_main_process
        from .gradients import compute_gradients

        init_distributed()
        model, config = _load_model(args)
        dataset = _load_dataset(args, model, config)
        state = args.optimizer_state or (args.adapter if args.feature == "adam" else None)
        path = compute_gradients(
            model, dataset, output_dir=args.output_dir, feature=args.feature, optimizer_state=state,
            adam_variant=args.adam_variant, projection=args.projection, dim=args.dim, seed=args.seed,
            batch_size=args.batch_size, dtype=args.dtype, on_bad_row=args.on_bad_row, max_length=args.max_length,
            learning_rate=args.learning_rate, checkpoint=os.path.basename(os.path.normpath(args.adapter)) if args.adapter else None,
            pad_token_id=getattr(config, "pad_token_id", None) or 0, shard_size=args.shard_size,
            max_tokens_per_batch=args.max_tokens_per_batch,
        )
        if is_main_process():
            print(path)
    elif args.command == "influence":
        from .callback import load_run
        from .influence import compute_influence

        if args.run:
            train, tasks = load_run(args.run)
        elif args.train and args.task:
            train, tasks = args.train, _parse_tasks(args.task)
        else:
            raise SystemExit("give --run DIR, or --train STORE... with at least one --task")
        scores = compute_influence(train, tasks, specialist=args.specialist, checkpoint_weights=args.checkpoint_weights,
                                   batch_size=args.batch_size, cache_file_name=args.cache_file, work_dir=args.work_dir)
        scores.save_to_disk(args.output)
        print(args.output)
    elif args.command == "select":
        from datasets import load_from_disk

        from .consensus import select

        scores = select(load_from_disk(args.scores), fraction=args.fraction, threshold_percentile=args.threshold_percentile,
                        method=args.method, task=args.task, seed=args.seed, num_rows=args.num_rows,
                        task_floor=args.task_floor)
        scores.save_to_disk(args.output)
        info = json.loads(scores.info.description)["selection"]
        print(f"selected {info['num_selected']} of {info['num_candidates']} rows -> {args.output}")
    elif args.command == "export":
        from datasets import load_from_disk

        from .export import export_selection

        print(export_selection(args.pool, load_from_disk(args.scores), args.output_dir, license=args.license,
                               pretty_name=args.pretty_name, tags=args.tag))
    elif args.command == "report":
        from .report import write_report

        print(write_report(args.export_dir, args.output_dir, group_column=args.group_column))
    elif args.command == "push":
        from .hub import push_selection

        print(push_selection(args.export_dir, args.repo_id, private=args.private or None, revision=args.revision,
                             create_pr=args.create_pr, embed_images=args.embed_images, image_folder=args.image_folder,
                             push_scores=not args.no_scores))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"icons-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
