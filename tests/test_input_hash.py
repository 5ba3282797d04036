"""Row identity of a pool tokenized by the user (no record_hash): the stores keep a hash of each row's model
inputs, the score table carries it in pool order, and export of a Dataset pool checks it. Stores written without
it keep the old behaviour: a warning, rows taken by position."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Features, Sequence, Value

from icons_hf import compute_gradients, compute_influence, export_selection, select
from icons_hf.cli import main
from icons_hf.pools import input_columns, input_hashes
from icons_hf.store import read_store_metadata
from icons_hf.testing import write_store

FAST = dict(dim=32, batch_size=4, show_progress=False)


def _tokenized(n=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = 4 + i % 3
        ids = rng.integers(3, 40, size=length).tolist()
        rows.append({"id": f"row{i}", "input_ids": ids, "labels": [-100] * 2 + ids[2:],
                     "attention_mask": [1] * length})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("input_hash")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    pool = _tokenized()
    train = compute_gradients(model, pool, output_dir=tmp / "train", **FAST)
    val = compute_gradients(model, _tokenized(3, seed=1), output_dir=tmp / "val", **FAST)
    scores = select(compute_influence(train, {"a": val, "b": val}), fraction=0.5)
    scores.save_to_disk(str(tmp / "selected"))
    return tmp, pool, train, scores


def test_store_and_score_table_carry_the_input_hash_in_pool_order(scored):
    tmp, pool, train, scores = scored
    meta = read_store_metadata(train)
    assert meta["input_hash"] is True and meta["record_hash"] is False
    assert meta["config"]["input_hash_columns"] == ["attention_mask", "input_ids", "labels"]
    assert scores["index"] == list(range(len(pool)))
    assert scores["input_hash"] == input_hashes(pool, ["attention_mask", "input_ids", "labels"])
    assert len(set(scores["input_hash"])) == len(pool)


def test_the_scored_tokenized_pool_exports_verified(scored):
    tmp, pool, _, scores = scored
    out = export_selection(pool, scores, tmp / "export")
    identity = json.load(open(os.path.join(out, "selection.json")))["row_identity"]
    assert identity.startswith("verified") and "input_hash" in identity


def test_a_tokenized_pool_shuffled_after_scoring_is_refused_by_export_and_cli(scored, capsys):
    tmp, pool, _, scores = scored
    order = np.random.default_rng(5).permutation(len(pool))
    shuffled = pool.select(order.tolist())
    first = int(np.flatnonzero(order != np.arange(len(pool)))[0])
    with pytest.raises(ValueError, match=rf"row {first} holds record .* another order"):
        export_selection(shuffled, scores, tmp / "export_shuffled")
    shuffled.save_to_disk(str(tmp / "shuffled_pool"))
    code = main(["export", "--pool", str(tmp / "shuffled_pool"), "--scores", str(tmp / "selected"),
                 "--output-dir", str(tmp / "cli_shuffled")])
    assert code == 2
    assert f"row {first} holds record" in capsys.readouterr().err
    assert not os.path.exists(tmp / "cli_shuffled" / "selection.json")


def test_an_edited_token_is_refused_and_a_dropped_column_is_named(scored):
    tmp, pool, _, scores = scored
    rows = pool.to_list()
    rows[6]["input_ids"] = [*rows[6]["input_ids"][:-1], 41]
    with pytest.raises(ValueError, match=r"row 6 holds record .* hold other records"):
        export_selection(Dataset.from_list(rows), scores, tmp / "export_edited")
    with pytest.raises(ValueError, match=r"lacks column 'attention_mask'"):
        export_selection(pool.remove_columns("attention_mask"), scores, tmp / "export_dropped")


def test_input_hash_is_canonical_over_storage_types_and_order_of_columns():
    ids = [[1, 2, 3], [4, 5]]
    wide = Dataset.from_dict({"input_ids": ids, "labels": ids, "pixel_values": [[0.5, 1.0], [2.0, 3.5]]})
    narrow = Dataset.from_dict(
        {"pixel_values": [[0.5, 1.0], [2.0, 3.5]], "labels": ids, "input_ids": ids, "text": ["a", "b"]},
        features=Features({"pixel_values": Sequence(Value("float32")), "labels": Sequence(Value("int32")),
                           "input_ids": Sequence(Value("int32")), "text": Value("string")}),
    )
    assert input_columns(narrow) == ["input_ids", "labels", "pixel_values"]
    columns = input_columns(wide)
    assert input_hashes(wide, columns) == input_hashes(narrow, columns)
    # Same values, other split into rows or other nesting: other hashes.
    regrouped = Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]], "labels": [[1, 2], [3, 4, 5]],
                                   "pixel_values": [[0.5, 1.0], [2.0, 3.5]]})
    assert input_hashes(regrouped, columns)[0] != input_hashes(wide, columns)[0]
    nested = Dataset.from_dict({"input_ids": ids, "labels": ids, "pixel_values": [[[0.5], [1.0]], [[2.0], [3.5]]]})
    assert input_hashes(nested, columns) != input_hashes(wide, columns)
    assert input_hashes(wide, columns, [1, 0]) == input_hashes(wide, columns)[::-1]
    # A row without a value in a column hashes as if the column were absent (a text part beside an image part).
    text = Dataset.from_dict({"input_ids": ids, "labels": ids})
    mixed = Dataset.from_dict({"input_ids": ids, "labels": ids, "pixel_values": [None, [2.0, 3.5]]})
    assert input_hashes(mixed, columns)[0] == input_hashes(text, ["input_ids", "labels"])[0]
    assert input_hashes(mixed, columns)[1] == input_hashes(wide, columns)[1]
    # Hashed in chunks of rows: a row's hash does not depend on the chunk it lands in.
    many = _tokenized(150, seed=4)
    together = input_hashes(many, ["input_ids", "labels"])
    assert together == [input_hashes(many.select([i]), ["input_ids", "labels"])[0] for i in range(150)]
    assert len(set(together)) == 150


def test_a_store_written_before_input_hashes_exports_by_position_with_a_warning(tmp_path, caplog):
    pool = _tokenized(8)
    rng = np.random.default_rng(0)
    train = write_store(tmp_path / "train", rng.normal(size=(8, 16)))
    meta = read_store_metadata(train)
    meta.pop("input_hash")  # as an older version wrote it
    with open(os.path.join(train, "store.json"), "w") as handle:
        json.dump(meta, handle)
    val = write_store(tmp_path / "val", rng.normal(size=(2, 16)))
    scores = select(compute_influence(train, {"a": val}), fraction=0.5)
    assert "input_hash" not in scores.column_names and "record_hash" not in scores.column_names
    with caplog.at_level(logging.WARNING, logger="icons_hf.export"):
        out = export_selection(pool.select(list(range(8))[::-1]), scores, tmp_path / "export")
    assert any("Row identity not verified" in r.getMessage() for r in caplog.records)
    assert json.load(open(os.path.join(out, "selection.json")))["row_identity"].startswith("not verified")


def test_the_store_refuses_a_shard_without_the_hashes_it_keeps(tmp_path):
    from icons_hf.store import StoreWriter

    writer = StoreWriter(tmp_path / "s", config={}, num_rows=2, shard_size=2, dim=2, dtype="float32",
                         input_hash=True)
    writer.open()
    with pytest.raises(ValueError, match="keeps input_hash per row"):
        writer.write_shard(0, 2, np.arange(2), np.ones((2, 2)))
    writer.write_shard(0, 2, np.arange(2), np.ones((2, 2)), input_hash=["a", "b"])
    with pa.OSFile(str(tmp_path / "s" / "shards" / "rows-0000000000-0000000002.arrow"), "rb") as source:
        assert pa.ipc.open_stream(source).read_all().column("input_hash").to_pylist() == ["a", "b"]


def test_sub_pools_with_other_columns_export_as_one_concatenated_pool(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    first = _tokenized(4, seed=7).map(lambda row: {"extra_ids": row["input_ids"][:2]})  # a column the model skips
    second = _tokenized(3, seed=8)
    parts = [compute_gradients(model, part, output_dir=tmp_path / name, **FAST)
             for name, part in (("first", first), ("second", second))]
    val = compute_gradients(model, _tokenized(2, seed=9), output_dir=tmp_path / "val", **FAST)
    scores = select(compute_influence([parts], {"t": val}), fraction=0.5)
    rows = [*first.to_list(), *({**r, "extra_ids": None} for r in second.to_list())]
    out = export_selection(Dataset.from_list(rows), scores, tmp_path / "export")
    assert "extra_ids" in json.load(open(os.path.join(out, "selection.json")))["row_identity"]
    with pytest.raises(ValueError, match=r"row 3 holds record .* another order"):
        export_selection(Dataset.from_list([*rows[:3], rows[4], rows[3], *rows[5:]]), scores, tmp_path / "bad")
