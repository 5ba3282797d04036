"""Formatting pool rows into model inputs.

LLaVA records (``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``) become ``input_ids`` and
``labels`` with the LLaVA-1.5 (Vicuna v1) layout::

    <bos>{system} USER: {human} ASSISTANT: {gpt}<eos>USER: ...

Only the assistant answers and their end-of-sequence token are supervised; ``<image>`` in a human turn expands
to ``num_image_tokens`` copies of the model's image token. The image path is kept as a column and turned into
``pixel_values`` when a row is read (``datasets`` transform), so a pool of millions of rows is never decoded
up front.

Chat rows (``messages``: ``[{"role", "content"}, ...]``, Tulu/LESS style) are rendered with the tokenizer's chat
template by :func:`format_chat`, which supervises only the assistant turns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch

from .gradients.extractor import collate_rows
from .pools import RECORD_HASH_COLUMN, iter_dataset_records, load_records, record_hash

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def format_conversation(
    conversations: Sequence[Mapping],
    tokenizer,
    *,
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    system: str | None = DEFAULT_SYSTEM,
    row: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not supervised) of one LLaVA conversation."""
    where = f"row {row}: " if row is not None else ""
    if not conversations:
        raise ValueError(f"{where}the conversation is empty.")
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [-100] * len(ids)
    if system:
        piece = _encode(tokenizer, system + " ")
        ids += piece
        labels += [-100] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token.")
    for turn_no, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}turn {turn_no} is a {type(turn).__name__}, not a {{'from', 'value'}} object.")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}turn {turn_no} has no text 'value'.")
        if speaker in ("human", "user"):
            parts = value.split(IMAGE_PLACEHOLDER)
            if len(parts) > 1 and (image_token_id is None or num_image_tokens <= 0):
                raise ValueError(f"{where}turn {turn_no} has an {IMAGE_PLACEHOLDER} but no image token is configured.")
            piece = _encode(tokenizer, "USER: ")
            for k, text in enumerate(parts):
                if k:
                    piece += [image_token_id] * num_image_tokens
                piece += _encode(tokenizer, text.strip("\n") if k else text.rstrip("\n"))
            piece += _encode(tokenizer, " ASSISTANT:")
            ids += piece
            labels += [-100] * len(piece)
        elif speaker in ("gpt", "assistant"):
            piece = _encode(tokenizer, " " + value) + [eos]
            ids += piece
            labels += piece
        else:
            raise ValueError(f"{where}turn {turn_no} is from {speaker!r}; expected 'human' or 'gpt'.")
    return ids, labels


def _check_image_placeholders(record: Mapping, row: int) -> None:
    """A record with an image mentions ``<image>`` in a human turn and one without an image does not: otherwise the
    model would get pixels without image tokens (or tokens without pixels) and fail only when features are computed."""
    turns = record.get("conversations")
    if not isinstance(turns, Sequence) or isinstance(turns, str):
        raise ValueError(f"row {row} (id {record.get('id')!r}): 'conversations' must be a list of {{'from', 'value'}} "
                         "turns.")
    mentions = sum(t.get("value", "").count(IMAGE_PLACEHOLDER) for t in turns
                   if isinstance(t, Mapping) and isinstance(t.get("value"), str))
    if record.get("image") is not None and mentions == 0:
        raise ValueError(f"row {row} (id {record.get('id')!r}) has an image but no {IMAGE_PLACEHOLDER} in its turns; "
                         f"put '{IMAGE_PLACEHOLDER}\\n' before the first question (LLaVA's layout) or drop the 'image' "
                         "field.")
    if record.get("image") is None and mentions:
        raise ValueError(f"row {row} (id {record.get('id')!r}) mentions {IMAGE_PLACEHOLDER} but has no 'image' field; "
                         "give it its image or remove the placeholder.")


def prepare_llava_dataset(
    records: Sequence[Mapping] | str | os.PathLike,
    tokenizer,
    *,
    image_processor=None,
    image_folder: str | os.PathLike | None = None,
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    system: str | None = DEFAULT_SYSTEM,
):
    """A ``datasets.Dataset`` of model inputs for LLaVA records (a list, or a ``.json``/``.jsonl`` path).

    Columns stored: ``input_ids``, ``labels``, ``record_hash`` (:func:`icons_hf.pools.record_hash` of the source
    record: the row's identity, carried into the gradient stores and checked by :func:`icons_hf.export_selection`)
    and, when any record has an image, ``image`` (resolved path). Reading a row yields the model inputs only:
    ``input_ids``, ``labels`` and, for rows with an image, ``pixel_values`` from ``image_processor``.
    Every image path is checked up front: a missing file is an error that names the row and the path.
    """
    from datasets import Dataset

    if isinstance(records, (str, os.PathLike)):
        records = load_records(records)
    columns = {"input_ids": [], "labels": [], RECORD_HASH_COLUMN: [], "image": []}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"row {i} is a {type(record).__name__}, not a LLaVA record object "
                             "(id, image, conversations).")
        _check_image_placeholders(record, i)
        ids, labels = format_conversation(
            record.get("conversations") or [], tokenizer, image_token_id=image_token_id,
            num_image_tokens=num_image_tokens if record.get("image") else 0, system=system, row=i,
        )
        image = record.get("image")
        if image is not None:
            if image_processor is None:
                raise ValueError(f"row {i} has an image ({image}) but no image_processor was given.")
            path = os.path.join(os.fspath(image_folder), image) if image_folder and not os.path.isabs(image) else image
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"row {i} (id {record.get('id')!r}): image {path} does not exist; check image_folder or the record."
                )
            image = path
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns[RECORD_HASH_COLUMN].append(record_hash(record))
        columns["image"].append(image)
    if all(p is None for p in columns["image"]):
        # A text-only pool: no image column.
        del columns["image"]
        return model_input_format(Dataset.from_dict(columns))
    dataset = Dataset.from_dict(columns)
    if image_processor is not None:
        if any(p is None for p in columns["image"]):
            raise ValueError(
                "the pool mixes rows with and without images; split it into image and text-only pools, which are "
                "batched separately."
            )
        dataset.set_transform(ImageLoader(image_processor))
    return dataset


def model_input_format(dataset):
    """Rows read from ``dataset`` hold its model inputs only (``input_ids``, ``labels``): the ``record_hash`` column
    stays in the table but out of every batch a model or collator sees; read it with
    ``icons_hf.pools.column_values(dataset, "record_hash")``."""
    dataset.set_format(columns=[c for c in dataset.column_names if c != RECORD_HASH_COLUMN])
    return dataset


class ImageLoader:
    """``datasets`` transform that adds ``pixel_values`` from the ``image`` path column."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, batch):
        from PIL import Image, UnidentifiedImageError

        images = []
        for path in batch["image"]:
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"image {path} cannot be read ({err}); fix or remove that row.") from None
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": batch["input_ids"], "labels": batch["labels"], "pixel_values": list(pixels)}


class IconsCollator:
    """Trainer data collator: right-pads token columns, stacks the rest (same rules as feature extraction).

    Columns that are no model input are left out: ``image`` (paths), ``index``, ``record_hash`` and any other
    column of strings."""

    def __init__(self, pad_token_id: int = 0, max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, features: list[Mapping]) -> dict[str, torch.Tensor]:
        skip = ("image", "index", RECORD_HASH_COLUMN)
        keys = [k for k in features[0] if k not in skip and not isinstance(features[0][k], str)]
        batch = {k: [f[k] for f in features] for k in keys}
        return collate_rows(batch, self.pad_token_id, self.max_length)


def _render_chat(tokenizer, messages, generation_prompt: bool, chat_template: str | None) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
    )


def assistant_spans(
    messages: Sequence[Mapping], tokenizer, *, chat_template: str | None = None, row: int | None = None
):
    """The chat rendered with the tokenizer's chat template, and the character spans of its assistant turns.

    A span runs from the start of the assistant's content to the end of its turn as the template renders it
    (end-of-turn marker included). Spans are found by rendering prefixes of the conversation: the text before
    turn ``i`` is the rendering of ``messages[:i]`` with the generation prompt, its end the rendering of
    ``messages[:i + 1]``; both must be prefixes of the whole rendering, which holds for templates that render
    each turn independently of the later ones.
    """
    where = f"row {row}: " if row is not None else ""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{where}'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for turn_no, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}message {turn_no} has no 'role'; each message needs 'role' and 'content'.")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}message {turn_no} has no text 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}the chat has no assistant message, so nothing would be supervised; drop the row.")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat_template= (a Jinja template string).")
    full = _render_chat(tokenizer, messages, False, chat_template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = ""
        if i:
            before = _render_chat(tokenizer, messages[:i], True, chat_template)
            if not full.startswith(before):
                # Templates that know no generation prompt: the assistant header is found below instead.
                before = _render_chat(tokenizer, messages[:i], False, chat_template)
        through = _render_chat(tokenizer, messages[: i + 1], False, chat_template)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise ValueError(
                f"{where}the chat template does not render the first {i + 1} messages as a prefix of the whole chat "
                "(it rewrites earlier turns), so assistant turns cannot be located; use a template that renders each "
                "turn independently (chat_template=)."
            )
        start, content = len(before), message["content"]
        found = full.find(content, start, len(through)) if content else -1
        spans.append((found if found >= 0 else start, len(through)))
    return full, spans


def format_chat(
    messages: Sequence[Mapping],
    tokenizer,
    *,
    chat_template: str | None = None,
    row: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not supervised) of a chat ``[{"role", "content"}, ...]``.

    The chat is rendered with the tokenizer's chat template (or ``chat_template``) and tokenized as a whole,
    exactly as ``apply_chat_template(..., tokenize=True)`` would; only the tokens of assistant turns (their content
    and end-of-turn marker, see :func:`assistant_spans`) are supervised. Needs a fast tokenizer (character
    offsets).
    """
    where = f"row {row}: " if row is not None else ""
    text, spans = assistant_spans(messages, tokenizer, chat_template=chat_template, row=row)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("format_chat needs a fast tokenizer (character offsets); load it with use_fast=True.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = []
    for token, (lo, hi) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = hi > lo and any(lo < end and start < hi for start, end in spans)
        labels.append(token if inside else -100)
    if all(label == -100 for label in labels[1:]):
        raise ValueError(f"{where}no assistant token survives tokenization; check the chat template.")
    return ids, labels


def prepare_chat_dataset(
    records,
    tokenizer,
    *,
    messages_key: str = "messages",
    chat_template: str | None = None,
):
    """A ``datasets.Dataset`` of ``input_ids`` and ``labels`` for chat rows (Tulu/LESS style).

    ``records``: a list of objects, a ``.json``/``.jsonl`` path, or a ``datasets.Dataset``, each row holding
    ``messages_key`` (a list of ``{"role", "content"}``). Row order is kept; a bad row is an error naming it.
    Columns: ``input_ids``, ``labels`` and ``record_hash`` (the source record's identity, see
    :func:`icons_hf.pools.record_hash`; kept out of the rows read, which hold the model inputs only).
    """
    from datasets import Dataset

    if isinstance(records, (str, os.PathLike)):
        records = load_records(records)
    elif isinstance(records, Dataset):
        records = iter_dataset_records(records)
    columns = {"input_ids": [], "labels": [], RECORD_HASH_COLUMN: []}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"row {i} is a {type(record).__name__}, not a record object with a {messages_key!r} "
                             "field.")
        if messages_key not in record:
            raise ValueError(f"row {i} has no {messages_key!r} field; pass messages_key= the field holding the chat.")
        ids, labels = format_chat(record[messages_key], tokenizer, chat_template=chat_template, row=i)
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns[RECORD_HASH_COLUMN].append(record_hash(record))
    return model_input_format(Dataset.from_dict(columns))
