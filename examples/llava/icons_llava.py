"""ICONS data selection for LLaVA-1.5-style models on a LLaVA-665K-format pool.

The pool is a LLaVA JSON/JSONL file (``[{"id", "image", "conversations": [{"from", "value"}, ...]}, ...]``) with
an image folder. The script warms up a LoRA adapter on a random share of the pool with ``transformers.Trainer``
and ``icons_hf.IconsCallback`` (gradient features of the pool and of each target task at every checkpoint),
scores the pool for every task, selects by consensus and exports the subset (the original records) with its
scores and dataset card; ``--push-to-hub`` publishes it. Text-only rows of the pool (LLaVA-665K has about 40K)
are a second sub-pool, scored with the image rows as one pool.

Single process::

    python examples/llava/icons_llava.py --model llava-hf/llava-1.5-7b-hf \\
        --data-path llava_v1_5_mix665k.json --image-folder playground/data \\
        --task vqav2=vqav2_val.json:coco/val2014 --task gqa=gqa_val.json:gqa/images \\
        --output-dir llava-icons --dtype bfloat16 --bf16 --gradient-checkpointing

Several GPUs: ``accelerate launch --config_file examples/configs/ddp.yaml examples/llava/icons_llava.py ...``.
See examples/README.md for the configs, the costs and the offline (``--checkpoints``) path.
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from icons_hf import recipes
from icons_hf.data import DEFAULT_SYSTEM, prepare_llava_dataset
from icons_hf.pools import load_records


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ICONS selection of a LLaVA-format instruction pool for a LLaVA-style model.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="model folder or Hub id (an image-text-to-text model, e.g. "
                       "llava-hf/llava-1.5-7b-hf)")
    model.add_argument("--processor", help="folder or Hub id of the tokenizer and image processor (default: --model)")
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype the model is loaded in (bfloat16 on GPUs; default: %(default)s)")
    model.add_argument("--attn-implementation", help="e.g. sdpa or flash_attention_2")
    model.add_argument("--num-image-tokens", type=int,
                       help="image tokens per image (default: the model config's image_seq_length, 576 for LLaVA-1.5)")
    data = parser.add_argument_group("pool")
    data.add_argument("--data-path", required=True, help="the pool: a LLaVA .json/.jsonl file")
    data.add_argument("--image-folder", help="folder the pool's image paths are relative to (also the default for "
                      "--task files)")
    data.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (default: LLaVA-1.5's Vicuna v1 prompt)")
    recipes.add_recipe_arguments(parser, learning_rate=2e-4,
                                 lora_target_regex=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    return parser


def image_settings(args) -> tuple[int, int]:
    """(image token id, image tokens per image) from the model config."""
    config = AutoConfig.from_pretrained(args.model)
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    count = args.num_image_tokens or getattr(config, "image_seq_length", None)
    if token is None or not count:
        raise ValueError(f"{args.model}: the config names no image token id / image_seq_length; is it a LLaVA-style "
                         "model? Pass --num-image-tokens if only the count is missing.")
    return int(token), int(count)


def task_records(rows, spec: recipes.TaskSpec, image_dir: str) -> list[dict]:
    """LLaVA records of a task's rows; images held in a dataset (Hub / save_to_disk) are written to ``image_dir``."""
    records = []
    for i, row in enumerate(rows):
        if not row.get("conversations"):
            raise ValueError(f"task {spec.task}: row {i} of {spec.source} has no 'conversations' (LLaVA format).")
        record = {"id": row.get("id", f"{spec.task}-{i}"), "conversations": list(row["conversations"])}
        image = row.get("image")
        if isinstance(image, dict) and image.get("bytes") is not None:
            image = Image.open(io.BytesIO(image["bytes"]))
        if isinstance(image, Image.Image):
            os.makedirs(image_dir, exist_ok=True)
            path = os.path.join(image_dir, f"{i}.png")
            if not os.path.isfile(path):
                image.convert("RGB").save(path)
            image = path
        elif isinstance(image, dict):
            image = image.get("path")
        if image is not None:
            record["image"] = image
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> str | None:
    args, recipe = recipes.parse_recipe_args(make_parser(), argv)
    state = recipes.process_state(recipe)
    tokenizer = AutoTokenizer.from_pretrained(args.processor or args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    recipe = recipes.with_pad_token(recipe, tokenizer.pad_token_id)
    image_token_id, num_image_tokens = image_settings(args)
    fmt = dict(tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(args.processor or args.model),
               image_token_id=image_token_id, num_image_tokens=num_image_tokens, system=args.system)

    records = load_records(args.data_path)
    if not records:
        raise ValueError(f"{args.data_path} holds no rows.")
    has_image = np.asarray([r.get("image") is not None for r in records])
    subpools = [
        recipes.SubPool(name, prepare_llava_dataset([records[i] for i in positions], image_folder=args.image_folder,
                                                    **(fmt if name == "image" else dict(fmt, image_processor=None))),
                        positions)
        for name, positions in (("image", np.flatnonzero(has_image)), ("text", np.flatnonzero(~has_image)))
        if len(positions)
    ]
    with state.main_process_first():  # images of dataset-held tasks are written once
        tasks = recipes.task_datasets(recipe, lambda rows, spec: prepare_llava_dataset(
            task_records(rows, spec, os.path.join(args.output_dir, "task_images", spec.task, spec.subtask or "")),
            image_folder=spec.image_folder or args.image_folder, **fmt))

    def load_model():
        kwargs = {"dtype": getattr(torch, args.dtype), "attn_implementation": args.attn_implementation}
        return AutoModelForImageTextToText.from_pretrained(args.model, **{k: v for k, v in kwargs.items() if v})

    stores = recipes.pool_stores(recipe, load_model, subpools, tasks, state)
    if stores is None or not state.is_main_process:
        return None
    scores = recipes.pool_scores(recipe, stores, subpools)
    return recipes.select_and_export(recipe, scores, args.data_path, tags=["llava"])


if __name__ == "__main__":
    main()
