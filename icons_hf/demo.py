"""The embedded default: ICONS end to end on easy-VQA with a tiny LLaVA-style model, on a CPU, offline.

easy-VQA (PyPI ``easy-vqa``, MIT) ships 64x64 images of one coloured shape and questions about its shape, its
colour, or yes/no facts: three natural target tasks. The model is a ``LlavaForConditionalGeneration`` built from
a small config (random init) with LoRA on the language model and a trainable projector. The demo warms up with
``transformers.Trainer`` + :class:`IconsCallback`, scores the pool for the three tasks, selects 20% with the
library's default rule, and exports the subset (LLaVA JSON) and its card.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TASKS = ("shape", "color", "yesno")


def answer_task(answer: str) -> str:
    """easy-VQA question type by its answer."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yesno"
    raise ValueError(f"unexpected easy-VQA answer {answer!r}")


@dataclass
class DemoConfig:
    output_dir: str = "icons_demo"
    pool_size: int = 3000
    validation_per_task: int = 24
    warmup_fraction: float = 0.1
    warmup_epochs: int = 4
    checkpoints: int = 2
    fraction: float = 0.2
    threshold_percentile: float = 80.0
    dim: int = 2048
    batch_size: int = 16
    seed: int = 0


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_tokenizer(texts):
    """A word-level tokenizer over the given texts (built in code: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .data import DEFAULT_SYSTEM

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for text in [*texts, DEFAULT_SYSTEM, "USER: ASSISTANT:"]:
        for word in _words(text):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    core.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def build_tiny_llava(vocab_size: int, image_token_id: int, pad_token_id: int, seed: int = 0):
    """A small ``LlavaForConditionalGeneration`` (32x32 images, 8x8 patches -> 16 image tokens)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=48,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def easy_vqa_records(split: str) -> tuple[list[dict], str]:
    """easy-VQA questions of a split as LLaVA records, and the image folder they refer to."""
    import easy_vqa

    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    folder = os.path.dirname(next(iter(paths.values())))
    records = [
        {
            "id": f"easyvqa-{split}-{i}",
            "image": os.path.basename(paths[image_id]),
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))
    ]
    return records, folder


def answer_balanced(records: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` records drawn round-robin over their answers (no answer class dominates)."""
    by_answer: dict[str, list[dict]] = {}
    for r in records:
        by_answer.setdefault(r["conversations"][1]["value"], []).append(r)
    for rows in by_answer.values():
        rng.shuffle(rows)
    out, keys = [], sorted(by_answer)
    while len(out) < n and any(by_answer.values()):
        for key in keys:
            if by_answer[key] and len(out) < n:
                out.append(by_answer[key].pop())
    return out


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run the embedded default; returns a summary (also written to ``<output_dir>/summary.json``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from . import IconsCallback, compute_influence, export_selection, select
    from .consensus import column_arrays, vote_histogram
    from .data import IconsCollator, prepare_llava_dataset
    from .report import write_report

    config = config or DemoConfig()
    rng = np.random.default_rng(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    train_records, train_folder = easy_vqa_records("train")
    test_records, test_folder = easy_vqa_records("test")
    pool_records = [train_records[i] for i in np.sort(rng.choice(len(train_records), config.pool_size, replace=False))]
    pool_path = os.path.join(config.output_dir, "pool.json")
    with open(pool_path, "w") as handle:
        json.dump(pool_records, handle)

    tokenizer = build_tokenizer(
        [t["value"] for r in train_records + test_records for t in r["conversations"]]
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = image_processor()
    fmt = dict(tokenizer=tokenizer, image_processor=processor, image_token_id=image_token_id, num_image_tokens=16)
    pool = prepare_llava_dataset(pool_records, image_folder=train_folder, **fmt)
    val_records = {t: [r for r in test_records if answer_task(r["conversations"][1]["value"]) == t] for t in TASKS}
    tasks = {
        t: prepare_llava_dataset(answer_balanced(val_records[t], config.validation_per_task, rng), image_folder=test_folder, **fmt)
        for t in TASKS
    }
    warm_idx = np.sort(rng.choice(len(pool_records), max(1, int(config.warmup_fraction * len(pool_records))), replace=False))
    warmup = prepare_llava_dataset([pool_records[i] for i in warm_idx], image_folder=train_folder, **fmt)

    model = build_tiny_llava(len(tokenizer), image_token_id, tokenizer.pad_token_id, seed=config.seed)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(model, lora)
    steps_per_epoch = -(-len(warmup) // config.batch_size)
    total_steps = steps_per_epoch * config.warmup_epochs
    args = TrainingArguments(
        output_dir=os.path.join(config.output_dir, "warmup"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.warmup_epochs,
        learning_rate=2e-3,
        lr_scheduler_type="linear",
        warmup_steps=max(1, total_steps // 10),
        save_strategy="steps",
        save_steps=max(1, total_steps // config.checkpoints),
        logging_steps=max(1, total_steps // 10),
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        seed=config.seed,
        disable_tqdm=True,
    )
    callback = IconsCallback(pool, tasks, os.path.join(config.output_dir, "features"), dim=config.dim,
                             batch_size=config.batch_size, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=warmup, data_collator=IconsCollator(tokenizer.pad_token_id),
                      callbacks=[callback])
    torch.manual_seed(config.seed)
    trainer.train()

    train_paths, task_paths = callback.stores()
    scores = select(compute_influence(train_paths, task_paths), fraction=config.fraction,
                    threshold_percentile=config.threshold_percentile)
    subset_dir = export_selection(pool_path, scores, os.path.join(config.output_dir, "subset"), license="mit",
                                  pool_name="easy-vqa-pool", tags=["easy-vqa"])
    selected = np.zeros(len(pool_records), dtype=bool)
    selected[column_arrays(scores, ["index", "selected"])["index"][column_arrays(scores, ["selected"])["selected"]]] = True
    kinds = [answer_task(r["conversations"][1]["value"]) for r in pool_records]
    summary = {
        "config": asdict(config),
        "pool_rows": len(pool_records),
        "selected_rows": int(selected.sum()),
        "checkpoints": [c["checkpoint"] for c in callback.checkpoints],
        "pool_by_task": dict(Counter(kinds)),
        "selected_by_task": dict(Counter(k for k, s in zip(kinds, selected) if s)),
        "vote_histogram": vote_histogram(scores),
        "subset_dir": subset_dir,
    }
    summary["report"] = write_report(subset_dir, groups=kinds, group_name="question type")
    with open(os.path.join(config.output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"Selected {summary['selected_rows']} of {summary['pool_rows']} pool rows "
        f"(checkpoints: {', '.join(summary['checkpoints'])}).",
        "",
        "rows per task      pool   subset   share of subset",
    ]
    for task in TASKS:
        n_pool = summary["pool_by_task"].get(task, 0)
        n_sel = summary["selected_by_task"].get(task, 0)
        lines.append(f"  {task:<14} {n_pool:>6}   {n_sel:>6}   {n_sel / max(1, summary['selected_rows']):>6.1%}")
    lines += ["", "votes      pool   subset"]
    for votes, counts in summary["vote_histogram"].items():
        lines.append(f"  {votes:<6} {counts['pool']:>6}   {counts['selected']:>6}")
    lines += ["", f"Subset, scores and dataset card: {summary['subset_dir']}"]
    if summary.get("report"):
        lines.append(f"Selection report: {summary['report']}")
    return "\n".join(lines)
