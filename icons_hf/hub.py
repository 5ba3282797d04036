"""Push a folder written by :func:`icons_hf.export_selection` to the Hugging Face Hub.

:func:`push_selection` takes three steps, each through the public Hugging Face APIs:

1. the selected rows are loaded as a ``datasets.Dataset`` (the ``data/*.parquet`` shards of an ``hf`` pool, or the
   original records of a LLaVA ``.json``/``.jsonl`` pool) and pushed with
   ``Dataset.push_to_hub(repo_id, split="train")`` as the repository's default config, so that
   ``load_dataset(repo_id, split="train")`` returns the selected rows;
2. if ``push_scores``, ``scores.parquet`` is pushed as a second config named ``"scores"``
   (``load_dataset(repo_id, "scores", split="train")``);
3. the export's ``README.md`` is uploaded as the dataset card. Its own YAML (license, tags, task_categories,
   size_categories, pretty_name, ...) and body are kept; its ``configs`` and ``dataset_info`` are replaced by the
   ones ``push_to_hub`` wrote on the Hub, which describe the files actually pushed (so both configs stay declared).

LLaVA pools are pushed as records only by default (``id``, ``image`` (the relative path, as a string) and
``conversations``), like the public ``LLAVA-ICONS-133K`` dataset; the images stay with the user's copy of the
LLaVA image folders. With ``embed_images=True`` the ``image`` column becomes a ``datasets.Image()`` column whose
bytes are read from ``image_folder`` (the folder the relative paths start from) and stored in the Parquet shards;
rows without an image get ``None``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from datasets import Dataset
from huggingface_hub import DatasetCard, HfApi

from .export import ExportFolder, read_export
from .pools import is_records_format

logger = logging.getLogger(__name__)

__all__ = ["push_selection"]

SCORES_CONFIG = "scores"
# Card metadata keys owned by push_to_hub (they describe what is on the Hub); every other key of the
# card (license, tags, task_categories, size_categories, pretty_name, ...) comes from the export.
_HUB_OWNED_METADATA = ("configs", "dataset_info")


def push_selection(
    output_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
    revision: str | None = None, create_pr: bool = False, embed_images: bool = False, push_scores: bool = True,
    max_shard_size: int | str = "500MB", commit_message: str | None = None,
    image_folder: str | os.PathLike | None = None,
) -> str:
    """Push an exported ICONS selection to a dataset repository on the Hub (the steps: :mod:`icons_hf.hub`).

    The selected rows become the default config, the score table the ``"scores"`` config and the export's
    ``README.md`` the dataset card. LLaVA pools are pushed as records (``id``, ``image`` path, ``conversations``)
    unless ``embed_images=True``, which stores the images themselves.

    Args:
        output_dir: a folder written by ``icons_hf.export_selection``.
        repo_id: ``"namespace/name"`` of the dataset repository (created if missing; a bare name
            goes to the token owner's namespace).
        private: visibility of the repository when it is created (ignored if it exists).
        token: a Hub token. ``None`` uses ``HF_TOKEN``, then the cached ``hf auth login`` token (the
            libraries' own lookup). The token is only sent in Authorization headers; it is never
            logged, printed or written.
        revision: branch to push to (created from ``main`` if missing).
        create_pr: open one pull request holding all the commits (data, scores, card) instead of
            committing to ``revision`` directly.
        embed_images: LLaVA pools only: store the images in the dataset as a ``datasets.Image()`` column.
        push_scores: also push the score table as the ``"scores"`` config.
        max_shard_size: largest Parquet shard pushed, e.g. ``"500MB"`` or a number of bytes.
        commit_message: summary of the data commit (the scores and card commits get a suffix).
        image_folder: root folder of the LLaVA images; required by ``embed_images=True``.

    Returns:
        The URL of the pull request when ``create_pr=True``, else the URL of the last commit
        (``<endpoint>/datasets/<repo_id>/commit/<sha>``).

    Raises:
        FileNotFoundError: ``output_dir`` is not an export (the missing file is named), or an image
            is missing under ``image_folder`` (the row and path are named).
        ValueError: inconsistent export files or arguments.
    """
    export = read_export(output_dir, need=("README.md", "scores.parquet") if push_scores else ("README.md",))
    _check_image_arguments(export, embed_images=embed_images, image_folder=image_folder)
    subset = _load_subset(export, embed_images=embed_images, image_folder=image_folder)
    scores = Dataset.from_parquet(str(export.file("scores.parquet"))) if push_scores else None
    card = DatasetCard.load(export.file("README.md"))
    message = commit_message or f"Upload ICONS selection ({len(subset):,} rows)"
    pushed = _push_subset(subset, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                          max_shard_size=max_shard_size, message=message)
    if scores is not None:
        _push_scores(scores, pushed)
    return _push_card(card, pushed)


# -- pushes -------------------------------------------------------------------------------------


@dataclass
class _PushedSubset:
    """Where the data push went: the scores and card commits follow it there."""

    repo_id: str  # namespace included, as the Hub resolved a bare name
    revision: str | None  # the pull request opened by the data push, or the caller's revision
    pr_url: str | None  # the pull request's URL when create_pr=True
    message: str  # summary of the data commit; the later commits add a suffix
    max_shard_size: int | str
    token: str | None = field(default=None, repr=False)  # kept out of repr: never logged


def _push_subset(subset: Dataset, repo_id: str, *, private: bool | None, token: str | None, revision: str | None,
                 create_pr: bool, max_shard_size: int | str, message: str) -> _PushedSubset:
    """Push the selected rows as the default config (step 1)."""
    logger.info("Pushing %d selected rows to dataset repo %s (revision=%s, create_pr=%s)",
                len(subset), repo_id, revision or "main", create_pr)
    info = subset.push_to_hub(
        repo_id,
        split="train",
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
        commit_message=message,
        embed_external_files=True,
    )
    # Later commits go to the same place: the pull request opened by the first push, or `revision`.
    return _PushedSubset(repo_id=info.repo_url.repo_id, revision=info.pr_revision if create_pr else revision,
                         pr_url=info.pr_url if create_pr else None, message=message, max_shard_size=max_shard_size,
                         token=token)


def _push_scores(scores: Dataset, pushed: _PushedSubset) -> None:
    """Push the score table as the ``"scores"`` config, next to the subset (step 2)."""
    logger.info("Pushing the score table (%d rows) as config %r", len(scores), SCORES_CONFIG)
    scores.push_to_hub(
        pushed.repo_id,
        config_name=SCORES_CONFIG,
        split="train",
        token=pushed.token,
        revision=pushed.revision,
        max_shard_size=pushed.max_shard_size,
        commit_message=f"{pushed.message} (scores)",
    )


def _push_card(card: DatasetCard, pushed: _PushedSubset) -> str:
    """Upload the card with the Hub's configs merged in (step 3); returns the URL push_selection returns."""
    _merge_hub_metadata(card, HfApi(token=pushed.token), pushed.repo_id, pushed.revision)
    card_url = card.push_to_hub(
        pushed.repo_id,
        token=pushed.token,
        repo_type="dataset",
        revision=pushed.revision,
        commit_message=f"{pushed.message} (dataset card)",
    )
    logger.info("Pushed the selection to %s", pushed.repo_id)
    return pushed.pr_url if pushed.pr_url is not None else str(card_url)


# -- export folder ------------------------------------------------------------------------------


def _check_image_arguments(export: ExportFolder, *, embed_images: bool,
                           image_folder: str | os.PathLike | None) -> None:
    if embed_images and not is_records_format(export.format):
        raise ValueError(
            "embed_images=True applies to LLaVA JSON/JSONL pools; an 'hf' pool is pushed with the columns "
            "(and Image features) it already has."
        )
    if image_folder is not None and not embed_images:
        raise ValueError("image_folder is only used with embed_images=True; pass both or neither.")


def _load_subset(export: ExportFolder, *, embed_images: bool, image_folder: str | os.PathLike | None) -> Dataset:
    if embed_images and image_folder is None:
        raise ValueError(
            "embed_images=True needs image_folder=: the folder the LLaVA 'image' paths are relative to."
        )
    subset = export.subset_pool().to_dataset(image_folder=image_folder if embed_images else None)
    if len(subset) != export.metadata["num_selected"]:
        raise ValueError(
            f"{export.path}: the subset has {len(subset)} rows but {export.metadata['num_selected']} were selected; "
            "re-run export_selection."
        )
    return subset


# -- dataset card -------------------------------------------------------------------------------


def _merge_hub_metadata(card: DatasetCard, api: HfApi, repo_id: str, revision: str | None) -> None:
    """Replace the card's Hub-owned metadata (configs, dataset_info) with what push_to_hub wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        remote_path = api.hf_hub_download(
            repo_id, "README.md", repo_type="dataset", revision=revision, cache_dir=tmp
        )
        remote = DatasetCard.load(remote_path)
    for key in _HUB_OWNED_METADATA:
        value = remote.data.get(key)
        if value is not None:
            card.data[key] = value
        else:
            card.data.pop(key, None)
