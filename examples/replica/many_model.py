"""The tiny causal LM of the many-task replica (built from a config in code), its training loop and its scoring."""

from __future__ import annotations

import numpy as np
import torch
from many_tasks import ALL_ANSWERS, PAD_ID, TARGETS, TOKEN, VOCAB, encode, leaf_tasks
from replica_common import fixed_step_training

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def new_model(seed: int, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=PAD_ID, bos_token_id=TOKEN["^"],
                         eos_token_id=TOKEN[";"], tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def add_lora(model, seed: int, r: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def tensorize(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``labels``/``attention_mask`` of pool rows (dicts with ``segments``)."""
    encoded = [encode(r["segments"], r.get("prefix", "")) for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def as_dataset(rows: list[dict]):
    """The rows as a ``datasets.Dataset`` of unpadded ``input_ids``/``labels`` (what IconsCallback reads)."""
    from datasets import Dataset

    encoded = [encode(r["segments"], r.get("prefix", "")) for r in rows]
    return Dataset.from_dict({"input_ids": [x for x, _ in encoded], "labels": [y for _, y in encoded]})


def train_fixed_steps(model, data: dict, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """AdamW with linear warmup/decay for exactly ``steps`` steps on reshuffled epochs of the rows (the same
    generator seed for every rule, so only the rows differ); each batch is cut to its longest row. Returns the
    last loss."""

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        width = int(data["attention_mask"][batch].sum(dim=1).max())
        return model(**{k: data[k][batch, :width] for k in ("input_ids", "labels", "attention_mask")}).loss

    return fixed_step_training(model, batch_loss, len(data["input_ids"]), steps=steps, batch_size=batch_size, lr=lr,
                               seed=seed)


def test_sets(questions: dict[str, list[tuple[str, str]]]) -> dict[str, dict]:
    """Per leaf task: tensors of its one-segment test rows, the answer position and the answer-space ids."""
    out = {}
    for leaf, qa in questions.items():
        data = tensorize([{"segments": [pair]} for pair in qa])
        space = ALL_ANSWERS[leaf.split("/")[0]]
        data["answer_pos"] = (data["labels"] != -100).to(torch.int8).argmax(dim=1) - 1
        data["space"] = torch.tensor([TOKEN[a] for a in space])
        data["gold"] = torch.tensor([space.index(a) for _, a in qa])
        out[leaf] = data
    return out


@torch.no_grad()
def evaluate(model, tests: dict[str, dict]) -> dict[str, float]:
    """Accuracy (%) per target task: argmax over the task's answer space at the answer position; a task with
    subtasks scores the mean of its subtasks' accuracies (as MME sums its subtasks)."""
    model.eval()
    leaf_acc = {}
    for leaf, data in tests.items():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        at = logits[torch.arange(len(logits)), data["answer_pos"]][:, data["space"]]
        leaf_acc[leaf] = float((at.argmax(dim=1) == data["gold"]).float().mean() * 100)
    return {t: float(np.mean([leaf_acc[leaf] for leaf in leaf_tasks(t)])) for t in TARGETS
            if leaf_tasks(t)[0] in leaf_acc}
