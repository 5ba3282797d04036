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
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from .callback import IconsCallback
from .consensus import select, vote_histogram
from .data import IconsCollator, prepare_llava_dataset
from .export import export_selection
from .influence import compute_influence
from .ranks import column_arrays
from .report import write_report
from .testing import (
    TASKS,
    answer_balanced,
    answer_task,
    build_tiny_llava,
    build_tokenizer,
    easy_vqa_records,
    image_processor,
)

logger = logging.getLogger(__name__)


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


def prepare_material(config: DemoConfig) -> dict:
    """The demo's pool (written as LLaVA JSON), its three tasks' validation sets and the warmup sample, formatted
    for the tiny LLaVA; ``{"pool_path", "pool_records", "tokenizer", "pool", "tasks", "warmup"}``."""
    rng = np.random.default_rng(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    train_records, train_folder = easy_vqa_records("train")
    test_records, test_folder = easy_vqa_records("test")
    pool_records = [train_records[i] for i in np.sort(rng.choice(len(train_records), config.pool_size, replace=False))]
    pool_path = os.path.join(config.output_dir, "pool.json")
    with open(pool_path, "w") as handle:
        json.dump(pool_records, handle)

    tokenizer = build_tokenizer([t["value"] for r in train_records + test_records for t in r["conversations"]])
    fmt = dict(tokenizer=tokenizer, image_processor=image_processor(),
               image_token_id=tokenizer.convert_tokens_to_ids("<image>"), num_image_tokens=16)
    val_records = {t: [r for r in test_records if answer_task(r["conversations"][1]["value"]) == t] for t in TASKS}
    tasks = {
        t: prepare_llava_dataset(answer_balanced(val_records[t], config.validation_per_task, rng),
                                 image_folder=test_folder, **fmt)
        for t in TASKS
    }
    n_warmup = max(1, int(config.warmup_fraction * len(pool_records)))
    warm_idx = np.sort(rng.choice(len(pool_records), n_warmup, replace=False))
    return {
        "pool_path": pool_path,
        "pool_records": pool_records,
        "tokenizer": tokenizer,
        "pool": prepare_llava_dataset(pool_records, image_folder=train_folder, **fmt),
        "tasks": tasks,
        "warmup": prepare_llava_dataset([pool_records[i] for i in warm_idx], image_folder=train_folder, **fmt),
    }


def warm_up(config: DemoConfig, material: dict) -> IconsCallback:
    """LoRA warmup of the tiny LLaVA with ``Trainer`` + :class:`IconsCallback`; returns the callback (its stores)."""
    tokenizer = material["tokenizer"]
    model = build_tiny_llava(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id,
                             seed=config.seed)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(model, lora)
    total_steps = -(-len(material["warmup"]) // config.batch_size) * config.warmup_epochs
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
    callback = IconsCallback(material["pool"], material["tasks"], os.path.join(config.output_dir, "features"),
                             dim=config.dim, batch_size=config.batch_size, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=material["warmup"],
                      data_collator=IconsCollator(tokenizer.pad_token_id), callbacks=[callback])
    torch.manual_seed(config.seed)
    trainer.train()
    return callback


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run the embedded default; returns a summary (also written to ``<output_dir>/summary.json``)."""
    config = config or DemoConfig()
    material = prepare_material(config)
    callback = warm_up(config, material)
    train_paths, task_paths = callback.stores()
    scores = select(compute_influence(train_paths, task_paths), fraction=config.fraction,
                    threshold_percentile=config.threshold_percentile)
    subset_dir = export_selection(material["pool_path"], scores, os.path.join(config.output_dir, "subset"),
                                  license="mit", pool_name="easy-vqa-pool", tags=["easy-vqa"])
    pool_records = material["pool_records"]
    columns = column_arrays(scores, ["index", "selected"])
    selected = np.zeros(len(pool_records), dtype=bool)
    selected[columns["index"][columns["selected"]]] = True
    kinds = [answer_task(r["conversations"][1]["value"]) for r in pool_records]
    summary = {
        "config": asdict(config),
        "pool_rows": len(pool_records),
        "selected_rows": int(selected.sum()),
        "checkpoints": [c["checkpoint"] for c in callback.checkpoints],
        "pool_by_task": dict(Counter(kinds)),
        "selected_by_task": dict(Counter(k for k, s in zip(kinds, selected, strict=True) if s)),
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
