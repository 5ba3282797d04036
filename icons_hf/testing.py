"""Small builders for tests, examples, benchmarks and the replicas; nothing here downloads anything.

* tiny models built from configs in code: :func:`tiny_llama`, :func:`tiny_lora_llama` (a 2-layer Llama with
  LoRA), :func:`build_tiny_llava` (the demo's ``LlavaForConditionalGeneration``);
* data: :func:`token_rows` (random token rows with a supervised suffix), :func:`build_tokenizer` (a word-level
  tokenizer over given texts), :func:`image_processor` (a Pillow-backed CLIP processor), :func:`easy_vqa_records`
  (the questions of the ``easy-vqa`` package as LLaVA records) with :func:`answer_task` / :func:`answer_balanced`;
* :func:`write_store`: a finished gradient store holding given features, as :func:`icons_hf.compute_gradients`
  writes one, for checking influence and selection against a brute-force reference.

Models and rows are random but fixed by their ``seed``, so a worker process started by a test (under
``accelerate launch`` or killed midway) rebuilds exactly what the test built.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from .data import DEFAULT_SYSTEM
from .store import StoreWriter

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TASKS = ("shape", "color", "yesno")

# ------------------------------------------------------------------------------------------- text models


def tiny_llama(seed: int = 0, vocab_size: int = 64, max_position_embeddings: int = 64):
    """A 2-layer ``LlamaForCausalLM`` (hidden size 32), random weights fixed by ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
    )
    return LlamaForCausalLM(config)


def tiny_lora_llama(
    seed: int = 0, vocab_size: int = 64, r: int = 4, target_modules: Sequence[str] = ("q_proj", "v_proj")
):
    """:func:`tiny_llama` with LoRA on ``target_modules``; B is initialised non-zero, so every adapter weight has
    a gradient before the first update (peft's default B = 0 gives lora_A exactly zero gradients)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, target_modules=list(target_modules), init_lora_weights=False)
    return get_peft_model(tiny_llama(seed, vocab_size), config)


def token_rows(n: int, seed: int = 0, vocab_size: int = 64, min_len: int = 4, max_len: int = 14) -> list[dict]:
    """``n`` rows of random token ids (length in ``[min_len, max_len)``) whose labels supervise a random suffix."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len))
        ids = rng.integers(1, vocab_size, length).tolist()
        cut = int(rng.integers(1, length - 1))
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


@contextlib.contextmanager
def record_forward_calls(module) -> Iterator[list[dict]]:
    """Record each call of ``module`` while the block runs: ``{"input_shape": shape of input_ids (or None),
    "kwargs": sorted keyword names}``, e.g. to check how rows were batched or which head path was taken."""
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append({"input_shape": tuple(ids.shape) if hasattr(ids, "shape") else None, "kwargs": sorted(kwargs)})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------ the demo's LLaVA side


def answer_task(answer: str) -> str:
    """easy-VQA question type (``shape``, ``color`` or ``yesno``) by its answer."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yesno"
    raise ValueError(f"unexpected easy-VQA answer {answer!r}: expected a shape, a colour, 'yes' or 'no'.")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_tokenizer(texts: Sequence[str]):
    """A lower-casing word-level fast tokenizer whose vocabulary is the words of ``texts`` (and of the LLaVA
    prompt), with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and ``<image>`` as special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for text in [*texts, DEFAULT_SYSTEM, "USER: ASSISTANT:"]:
        for word in _words(text):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def build_tiny_llava(vocab_size: int, image_token_id: int, pad_token_id: int, seed: int = 0):
    """A small ``LlavaForConditionalGeneration`` (32x32 images, 8x8 patches -> 16 image tokens), random weights
    fixed by ``seed``."""
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
    """A Pillow-backed CLIP image processor for :func:`build_tiny_llava` (32x32 inputs)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def easy_vqa_records(split: str) -> tuple[list[dict], str]:
    """easy-VQA questions of ``split`` ("train" or "test") as LLaVA records, and the image folder they refer to.
    Needs the ``easy-vqa`` package (``pip install icons_hf[demo]``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: easy-VQA has the splits 'train' and 'test'.")
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("easy-VQA records need the easy-vqa package: pip install 'icons_hf[demo]'.") from None

    train = split == "train"
    questions, answers, image_ids = easy_vqa.get_train_questions() if train else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if train else easy_vqa.get_test_image_paths()
    folder = os.path.dirname(next(iter(paths.values())))
    records = [
        {
            "id": f"easyvqa-{split}-{i}",
            "image": os.path.basename(paths[image_id]),
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids, strict=True))
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


# ------------------------------------------------------------------------------------------ gradient stores


def write_store(
    path,
    features,
    *,
    indices=None,
    skip: Sequence[int] = (),
    shard_size: int | None = None,
    dtype: str = "float32",
    weights: str = "w0",
    learning_rate: float | None = None,
    checkpoint: str | None = None,
    record_hashes: Sequence[str] | None = None,
) -> str:
    """A finished store of plain-gradient features with the identity projection; returns its path.

    ``features`` has one row per pool row; the rows in ``skip`` are left out and recorded as skipped (reason
    ``"test"``). ``indices`` replaces the pool row each stored row claims (default: its position). ``weights``
    stands for the model weights' fingerprint: stores of one checkpoint must agree on it, and on the dimension.
    ``learning_rate`` and ``checkpoint`` are recorded as a checkpoint's are (they weight checkpoints).
    ``record_hashes`` (one string per feature row) makes a store that keeps each row's ``record_hash``.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-d array (rows x dim), got shape {features.shape}.")
    n, dim = features.shape
    indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) != n:
        raise ValueError(f"indices has {len(indices)} entries for {n} feature rows; give one per row.")
    if record_hashes is not None and len(record_hashes) != n:
        raise ValueError(f"record_hashes has {len(record_hashes)} entries for {n} feature rows; give one per row.")
    config = {"projection": {"kind": "identity", "dim": dim, "seed": 0}, "parameters": {"w": [dim]},
              "model_config": "m", "weights": weights, "preconditioner": {"feature": "sgd"}}
    extra = {k: v for k, v in (("learning_rate", learning_rate), ("checkpoint", checkpoint)) if v is not None}
    writer = StoreWriter(path, config=config, num_rows=n, shard_size=shard_size or max(1, n), dim=dim, dtype=dtype,
                         extra=extra, record_hash=record_hashes is not None)
    skipped = set(int(s) for s in skip)
    for start, end in writer.open():
        keep = [r for r in range(start, end) if r not in skipped]
        notes = {"skipped": [{"index": int(indices[r]), "reason": "test"} for r in range(start, end) if r in skipped]}
        hashes = None if record_hashes is None else [str(record_hashes[r]) for r in keep]
        writer.write_shard(start, end, indices[keep], features[keep], notes if notes["skipped"] else None, hashes)
    return writer.finalize()


__all__ = [
    "COLORS", "SHAPES", "SPECIAL", "TASKS", "answer_balanced", "answer_task", "build_tiny_llava", "build_tokenizer",
    "easy_vqa_records", "image_processor", "record_forward_calls", "tiny_llama", "tiny_lora_llama", "token_rows",
    "write_store",
]
