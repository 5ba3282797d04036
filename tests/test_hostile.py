"""Hostile input: every bad row is an error that names it, or (on_bad_row="skip") a recorded skip; never a silent
drop or a silent zero row."""

import json
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_gradients, compute_influence, export_selection, load_gradients, select
from icons_hf.gradients import BadRowError
from icons_hf.testing import write_store

FAST = dict(dim=64, batch_size=4, show_progress=False)


def _meta(path):
    with open(os.path.join(path, "store.json")) as handle:
        return json.load(handle)


def _features(path):
    store = load_gradients(path)
    return np.asarray(store["index"]), np.asarray(store["features"])


def _records(n, *, ids=None, image=None):
    words = ["red", "blue", "green", "circle", "square", "yes", "no"]
    out = []
    for i in range(n):
        record = {"id": ids[i] if ids else f"r{i}", "conversations": [
            {"from": "human", "value": f"{'<image>' + chr(10) if image else ''}what colour is shape {words[i % 3]} ?"},
            {"from": "gpt", "value": f"{words[(i * 5) % 7]} {words[(i + 3) % 7]}"},
        ]}
        if image:
            record["image"] = image(i)
        out.append(record)
    return out


def _tokenizer(records):
    from icons_hf.testing import build_tokenizer

    return build_tokenizer([t["value"] for r in records for t in r["conversations"]])


def _text_model(vocab_size, seed=0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


# ---- images ----


def test_missing_image_is_an_error_naming_the_row_and_path(tmp_path):
    from PIL import Image

    from icons_hf.data import prepare_llava_dataset
    from icons_hf.testing import image_processor

    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    records = _records(2, image=lambda i: f"{i}.png")
    tok = _tokenizer(records)
    with pytest.raises(FileNotFoundError, match=r"row 1 \(id 'r1'\): image .*1\.png does not exist"):
        prepare_llava_dataset(records, tok, image_processor=image_processor(), image_folder=tmp_path,
                              image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=16)


def test_unreadable_image_is_an_error_naming_the_row_or_a_recorded_skip(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from icons_hf.data import prepare_llava_dataset
    from icons_hf.testing import build_tiny_llava, image_processor

    for i in range(4):
        Image.new("RGB", (32, 32), ("red", "blue", "green", "white")[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"not an image at all")  # exists, cannot be decoded
    records = _records(4, image=lambda i: f"{i}.png")
    tok = _tokenizer(records)
    image_token = tok.convert_tokens_to_ids("<image>")
    pool = prepare_llava_dataset(records, tok, image_processor=image_processor(), image_folder=tmp_path,
                                 image_token_id=image_token, num_image_tokens=16)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_llava(len(tok), image_token, tok.pad_token_id),
                           LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                      init_lora_weights=False))
    with pytest.raises(BadRowError, match=r"row 2 cannot be read: image .*2\.png cannot be read"):
        compute_gradients(model, pool, output_dir=tmp_path / "err", **FAST)
    path = compute_gradients(model, pool, output_dir=tmp_path / "skip", on_bad_row="skip", **FAST)
    meta = _meta(path)
    assert [s["index"] for s in meta["skipped"]] == [2] and "cannot be read" in meta["skipped"][0]["reason"]
    index, feats = _features(path)
    assert index.tolist() == [0, 1, 3] and np.isfinite(feats).all() and (np.abs(feats).sum(axis=1) > 0).all()


# ---- rows that cannot give a gradient ----


def test_row_without_supervised_tokens_errors_or_is_skipped_and_reaches_the_card(tmp_path, tiny_lora_llama, token_rows):
    rows = token_rows(9, seed=1)
    rows[4]["labels"] = [-100] * len(rows[4]["labels"])
    rows[6]["labels"] = [rows[6]["input_ids"][0]] + [-100] * (len(rows[6]["labels"]) - 1)  # only the first: no target
    pool = Dataset.from_list(rows)
    model = tiny_lora_llama(seed=0)
    with pytest.raises(BadRowError, match=r"row 4: no supervised tokens"):
        compute_gradients(model, pool, output_dir=tmp_path / "err", **FAST)

    path = compute_gradients(model, pool, output_dir=tmp_path / "skip", on_bad_row="skip", dtype="float32", **FAST)
    meta = _meta(path)
    assert [s["index"] for s in meta["skipped"]] == [4, 6] and meta["num_features"] == 7 and meta["num_rows"] == 9
    assert all("no supervised tokens" in s["reason"] for s in meta["skipped"])
    index, feats = _features(path)
    assert index.tolist() == [0, 1, 2, 3, 5, 7, 8]
    # The other rows are untouched by their bad neighbours: same features as without the bad rows in the pool.
    good = [i for i in range(9) if i not in (4, 6)]
    clean = compute_gradients(model, pool.select(good), output_dir=tmp_path / "clean", dtype="float32", **FAST)
    np.testing.assert_allclose(feats, _features(clean)[1], rtol=1e-5, atol=1e-7)

    # Downstream: the skipped rows are never selected and the card and selection.json list them with reasons.
    val = compute_gradients(model, Dataset.from_list(token_rows(3, seed=2)), output_dir=tmp_path / "val",
                            dtype="float32", **FAST)
    scores = select(compute_influence(path, {"t": val}), fraction=0.5)
    assert scores["index"] == index.tolist() and sum(scores["selected"]) == 3
    out = export_selection(pool, scores, tmp_path / "export")
    card = open(os.path.join(out, "README.md")).read()
    assert "2 pool rows gave no gradient feature" in card and "| 4 | no supervised tokens" in card
    selection = json.load(open(os.path.join(out, "selection.json")))
    assert [s["index"] for s in selection["influence"]["skipped"]] == [4, 6]
    assert not set(json.load(open(os.path.join(out, "indices.json")))) & {4, 6}


def test_row_longer_than_the_model_limit(tmp_path, tiny_lora_llama, token_rows):
    rows = token_rows(5, seed=3)
    rng = np.random.default_rng(0)
    long_ids = rng.integers(1, 64, 70).tolist()  # the fixture's model takes 64 positions
    rows[3] = {"input_ids": long_ids, "labels": [-100] * 10 + long_ids[10:]}
    pool = Dataset.from_list(rows)
    model = tiny_lora_llama(seed=0)
    with pytest.raises(BadRowError, match=r"row 3: 70 tokens exceed the model's limit of 64; pass max_length <= 64"):
        compute_gradients(model, pool, output_dir=tmp_path / "err", **FAST)
    skipped = compute_gradients(model, pool, output_dir=tmp_path / "skip", on_bad_row="skip", **FAST)
    first = _meta(skipped)["skipped"][0]
    assert first["index"] == 3 and "exceed the model's limit" in first["reason"]
    # Truncation beyond the limit is still refused.
    with pytest.raises(BadRowError, match=r"row 3: 66 tokens after truncation exceed the model's limit of 64"):
        compute_gradients(model, pool, output_dir=tmp_path / "too_far", max_length=66, **FAST)

    path = compute_gradients(model, pool, output_dir=tmp_path / "cut", max_length=32, dtype="float32", **FAST)
    meta = _meta(path)
    assert meta["truncated"] == [{"index": 3, "from": 70, "to": 32}] and meta["skipped"] == []
    assert meta["config"]["max_length"] == 32
    # The truncated row's feature is that of the row cut by hand.
    rows[3] = {"input_ids": long_ids[:32], "labels": ([-100] * 10 + long_ids[10:])[:32]}
    by_hand = compute_gradients(model, Dataset.from_list(rows), output_dir=tmp_path / "by_hand", dtype="float32",
                                **FAST)
    np.testing.assert_allclose(_features(path)[1], _features(by_hand)[1], rtol=1e-5, atol=1e-7)


def test_non_finite_loss_errors_or_is_skipped(tmp_path, tiny_lora_llama, token_rows):
    import torch

    rows = token_rows(7, seed=4, vocab_size=63)  # token ids 1..62
    rows[5]["input_ids"][0] = 63
    pool = Dataset.from_list(rows)
    model = tiny_lora_llama(seed=0)
    clean = compute_gradients(model, pool.select([0, 1, 2, 3, 4, 6]), output_dir=tmp_path / "clean", dtype="float32",
                              **FAST)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[63] = float("inf")  # any row with token 63: loss is nan
    with pytest.raises(BadRowError, match=r"row 5: non-finite loss \(nan\)"):
        compute_gradients(model, pool, output_dir=tmp_path / "err", **FAST)
    path = compute_gradients(model, pool, output_dir=tmp_path / "skip", on_bad_row="skip", dtype="float32", **FAST)
    assert _meta(path)["skipped"] == [{"index": 5, "reason": "non-finite loss (nan)"}]
    index, feats = _features(path)
    assert index.tolist() == [0, 1, 2, 3, 4, 6]
    np.testing.assert_allclose(feats, _features(clean)[1], rtol=1e-5, atol=1e-7)


def test_zero_gradient_feature_is_never_stored_silently(tmp_path, tiny_lora_llama, token_rows):
    import torch

    model = tiny_lora_llama(seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.zero_()  # A = B = 0: every LoRA gradient is exactly zero
    pool = Dataset.from_list(token_rows(3, seed=5))
    with pytest.raises(BadRowError, match=r"row \d: its gradient feature is exactly zero"):
        compute_gradients(model, pool, output_dir=tmp_path / "err", **FAST)
    path = compute_gradients(model, pool, output_dir=tmp_path / "skip", on_bad_row="skip", **FAST)
    assert _meta(path)["num_features"] == 0 and len(_meta(path)["skipped"]) == 3


# ---- names, shapes and sizes ----


def test_unknown_or_invalid_task_names(tmp_path):
    rng = np.random.default_rng(0)
    train = write_store(tmp_path / "train", rng.normal(size=(6, 4)))
    val = write_store(tmp_path / "val", rng.normal(size=(2, 4)))
    scores = compute_influence(train, {"vqa": val, "ocr": val})
    with pytest.raises(ValueError, match=r"method='task' needs task= one of: vqa, ocr \(got 'chart'\)"):
        select(scores, method="task", task="chart")
    with pytest.raises(ValueError, match=r"method='task' needs task= one of: vqa, ocr \(got None\)"):
        select(scores, method="task")
    with pytest.raises(ValueError, match=r"task name 'my task' may only use"):
        compute_influence(train, {"my task": val})
    with pytest.raises(ValueError, match="no influence_<task> columns"):
        select(Dataset.from_dict({"index": [0, 1]}))


def test_train_and_validation_feature_dims_must_match(tmp_path):
    rng = np.random.default_rng(1)
    train = write_store(tmp_path / "train", rng.normal(size=(5, 6)))
    val = write_store(tmp_path / "val", rng.normal(size=(3, 8)))
    with pytest.raises(ValueError, match=r"val holds 8-dimensional features but .*train holds 6-dimensional ones"):
        compute_influence(train, {"t": val})


def test_empty_validation_sets(tmp_path, tiny_lora_llama, token_rows):
    model = tiny_lora_llama(seed=0)
    with pytest.raises(ValueError, match="dataset is empty"):
        compute_gradients(model, Dataset.from_dict({"input_ids": [], "labels": []}), output_dir=tmp_path / "e", **FAST)
    # A validation set whose every row was skipped: refused when scoring, saying why.
    rows = token_rows(2, seed=6)
    for row in rows:
        row["labels"] = [-100] * len(row["labels"])
    val = compute_gradients(model, Dataset.from_list(rows), output_dir=tmp_path / "val", on_bad_row="skip", **FAST)
    train = compute_gradients(model, Dataset.from_list(token_rows(4, seed=7)), output_dir=tmp_path / "train", **FAST)
    with pytest.raises(ValueError, match=r"validation store .*val holds no rows \(all 2 were skipped as bad rows\)"):
        compute_influence(train, {"t": val})
    with pytest.raises(ValueError, match="needs at least one validation example|non-empty mapping"):
        compute_influence(train, {})


def test_empty_task_dataset_is_refused_before_training(tmp_path, token_rows):
    from icons_hf import IconsCallback

    pool = Dataset.from_list(token_rows(3))
    with pytest.raises(ValueError, match=r"task 'vqa' has no validation rows"):
        IconsCallback(pool, {"vqa": Dataset.from_dict({"input_ids": [], "labels": []})})
    with pytest.raises(ValueError, match=r"task 'mme' subtask 'count' has no validation rows"):
        IconsCallback(pool, {"mme": {"count": Dataset.from_dict({"input_ids": [], "labels": []}), "color": pool}})
    with pytest.raises(ValueError, match="the pool has no rows"):
        IconsCallback(pool.select([]), {"vqa": pool})


def test_pool_of_one_row_through_the_whole_pipeline(tmp_path, tiny_lora_llama, token_rows):
    model = tiny_lora_llama(seed=0)
    pool = Dataset.from_list(token_rows(1, seed=8))
    train = compute_gradients(model, pool, output_dir=tmp_path / "train", **FAST)
    val = compute_gradients(model, Dataset.from_list(token_rows(1, seed=9)), output_dir=tmp_path / "val", **FAST)
    scores = compute_influence(train, {"a": val, "b": val})
    assert len(scores) == 1 and np.isfinite(scores["influence_a"][0])
    with pytest.raises(ValueError, match=r"fraction=0.2 of 1 rows selects no row"):
        select(scores, fraction=0.2)
    chosen = select(scores, fraction=1.0)
    assert chosen["selected"] == [True] and chosen["votes"] == [0] and chosen["tiebreak"] == [0.5]
    out = export_selection(pool, chosen, tmp_path / "export")
    assert json.load(open(os.path.join(out, "indices.json"))) == [0]
    assert Dataset.from_parquet(os.path.join(out, "data", "train-00000-of-00001.parquet")).to_list() == pool.to_list()
    assert select(scores, num_rows=0)["selected"] == [False]


def test_duplicate_llava_ids_are_selected_by_position_through_the_whole_pipeline(tmp_path):
    from icons_hf.data import prepare_llava_dataset

    records = _records(8, ids=["a", "b", "a", "a", "c", "b", "c", "a"])
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps(records))
    tok = _tokenizer(records)
    pool = prepare_llava_dataset(str(pool_file), tok)
    model = _text_model(len(tok))
    train = compute_gradients(model, pool, output_dir=tmp_path / "train", pad_token_id=tok.pad_token_id, **FAST)
    val = compute_gradients(model, prepare_llava_dataset(_records(2), tok), output_dir=tmp_path / "val",
                            pad_token_id=tok.pad_token_id, **FAST)
    scores = select(compute_influence(train, {"t": val}), fraction=0.5, method="task", task="t")
    chosen = [i for i, s in enumerate(scores["selected"]) if s]
    assert len(chosen) == 4
    out = export_selection(str(pool_file), scores, tmp_path / "export")
    exported = json.load(open(os.path.join(out, "pool_icons.json")))
    assert exported == [records[i] for i in chosen]  # positions, not ids: repeated ids keep their own record


# ---- pool files, export and publishing: wrong input is an error naming the row/file/argument ----


def _conv(q="what?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _prepare(records):
    from icons_hf.data import prepare_llava_dataset
    from icons_hf.testing import image_processor

    tok = _tokenizer([{"conversations": _conv()}])
    return prepare_llava_dataset(records, tok, image_processor=image_processor(),
                                 image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=4)


def _prepare_chat(records):
    from icons_hf.data import prepare_chat_dataset

    tok = _tokenizer([{"conversations": _conv()}])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return prepare_chat_dataset(records, tok)


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _load(tmp_path, name, text):
    from icons_hf.pools import load_pool

    return load_pool(_file(tmp_path, name, text))


def _dataset_dict_folder(tmp_path):
    from datasets import DatasetDict

    from icons_hf.pools import load_pool

    DatasetDict({"train": Dataset.from_dict({"a": [1]})}).save_to_disk(str(tmp_path / "dd"))
    return load_pool(str(tmp_path / "dd"))


def _selected_table(records=None):
    from icons_hf.pools import record_hash

    records = records or _records(6)
    table = Dataset.from_dict({"index": list(range(6)), "influence_t": [0.1, 0.5, 0.2, 0.9, 0.3, 0.7],
                               "record_hash": [record_hash(r) for r in records]})
    return select(table, fraction=0.5, method="task", task="t")


def _scored_export(tmp_path):
    records = _records(6)
    pool = _file(tmp_path, "pool.json", json.dumps(records))
    return export_selection(pool, _selected_table(records), tmp_path / "export")


def _edited_export(tmp_path):
    out = _scored_export(tmp_path)
    path = os.path.join(out, "pool_icons.json")
    chosen = json.load(open(path))
    chosen[1]["conversations"][1]["value"] = "edited by hand"
    json.dump(chosen, open(path, "w"))
    return out


def _push_edited(tmp_path):
    from icons_hf.hub import push_selection

    push_selection(_edited_export(tmp_path), "me/never-pushed")


def _report_edited(tmp_path):
    from icons_hf.report import write_report

    write_report(_edited_export(tmp_path))


HOSTILE_EDGES = [
    ("image_without_placeholder", lambda t: _prepare([{"id": "a", "image": "x.png", "conversations": _conv()}]),
     ValueError, r"row 0 \(id 'a'\) has an image but no <image> in its turns"),
    ("placeholder_without_image", lambda t: _prepare([{"id": "a", "conversations": _conv("<image>\nwhat?")}]),
     ValueError, r"row 0 \(id 'a'\) mentions <image> but has no 'image' field"),
    ("turn_not_an_object", lambda t: _prepare([{"id": "a", "conversations": ["what?", "red"]}]),
     ValueError, r"row 0: turn 0 is a str, not a \{'from', 'value'\} object"),
    ("conversations_a_string", lambda t: _prepare([{"id": "a", "conversations": "what? red"}]),
     ValueError, r"row 0 \(id 'a'\): 'conversations' must be a list"),
    ("record_not_an_object", lambda t: _prepare([["what?", "red"]]), ValueError,
     r"row 0 is a list, not a LLaVA record"),
    ("chat_row_not_an_object", lambda t: _prepare_chat(["hello"]), ValueError, r"row 0 is a str, not a record object"),
    ("chat_row_without_messages", lambda t: _prepare_chat([{"chat": []}]), ValueError,
     r"row 0 has no 'messages' field; pass messages_key="),
    ("pool_file_not_a_list", lambda t: _load(t, "p.json", '{"data": []}'), ValueError, r"p.json: expected a JSON list"),
    ("pool_row_not_an_object", lambda t: _load(t, "p.json", '[{"id": 1}, [1, 2]]'), ValueError,
     r"p.json: row 1 is a list, not a record object"),
    ("pool_jsonl_bad_line", lambda t: _load(t, "p.jsonl", '{"id": 1}\n{"id": \n'), ValueError,
     r"p.jsonl, line 2: not valid JSON"),
    ("pool_other_extension", lambda t: _load(t, "p.csv", "id\n1\n"), ValueError,
     r"expected a .json/.jsonl records file"),
    ("pool_dataset_dict_folder", _dataset_dict_folder, ValueError,
     r"holds a DatasetDict; pass the folder of one split"),
    ("pool_not_a_dataset_folder", lambda t: load_pool_folder(t), FileNotFoundError,
     r"is not a dataset saved with Dataset.save_to_disk"),
    ("pool_a_list_of_dicts", lambda t: export_selection([{"id": 1}], _selected_table(), t / "o"),
     TypeError, r"pool of type list is not supported; .* Dataset.from_list\(records\)"),
    ("scores_a_dict", lambda t: export_selection(str(t), {"index": [0]}, t / "o"), TypeError,
     r"scores of type dict is not supported; pass the Dataset that icons_hf.select returned"),
    ("scores_folder_not_a_table", lambda t: export_selection(str(t), str(t), t / "o"), FileNotFoundError,
     r"is not a score table folder"),
    ("record_not_json", lambda t: __import__("icons_hf.pools").pools.record_hash({"pixels": {1, 2}}), TypeError,
     r"record\['pixels'\] is a set, which cannot be hashed as JSON"),
    ("push_of_an_edited_subset_file", _push_edited, ValueError,
     r"pool_icons.json: record 1 \(pool row \d\) is not the record that was selected"),
    ("report_of_an_edited_subset_file", _report_edited, ValueError, r"record 1 \(pool row \d\) is not the record"),
]


def load_pool_folder(tmp_path):
    from icons_hf.pools import load_pool

    (tmp_path / "plain").mkdir()
    return load_pool(str(tmp_path / "plain"))


@pytest.mark.parametrize("build, error, message", [c[1:] for c in HOSTILE_EDGES], ids=[c[0] for c in HOSTILE_EDGES])
def test_hostile_pools_exports_and_publishing(tmp_path, build, error, message):
    with pytest.raises(error, match=message):
        build(tmp_path)


def test_one_task_category_or_tag_given_as_a_string_is_not_split_into_letters(tmp_path):
    _scored_export(tmp_path)
    out = export_selection(os.path.join(tmp_path, "pool.json"), _selected_table(), tmp_path / "strings",
                           task_categories="text-generation", tags="vqa")
    card = open(os.path.join(out, "README.md")).read()
    assert "- text-generation" in card and "- vqa" in card and "\n- t\n" not in card
