"""Export trusts no pool blindly: row identity by record hash, the output folder, the settings in the card.

Score tables are built by hand (with the ``record_hash`` column that the gradient stores and compute_influence
carry for pools formatted by icons_hf.data.prepare_*), so these tests need no model.
"""

import json
import logging
import os
import random

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import export_selection, select
from icons_hf.pools import dataset_record_hashes, load_pool, record_hash

N = 12


def _records(n=N, kind="llava"):
    out = []
    for i in range(n):
        if kind == "chat":
            out.append(
                {
                    "id": f"c{i}",
                    "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                }
            )
        else:
            record = {
                "id": f"r{i % 5}",
                "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}],
            }
            if i % 3 != 1:  # the first record has an image: Dataset.from_list takes its keys
                record["image"] = f"coco/{i:04d}.jpg"
            out.append(record)
    return out


def _scores(records, *, hashes=True, seed=0):
    rng = np.random.default_rng(seed)
    cols = {
        "index": list(range(len(records))),
        "influence_a": rng.normal(size=len(records)).tolist(),
        "influence_b": rng.normal(size=len(records)).tolist(),
    }
    if hashes:
        cols["record_hash"] = [record_hash(r) for r in records]
    return select(Dataset.from_dict(cols), fraction=0.5)


def _write(path, records):
    with open(path, "w") as handle:
        if str(path).endswith(".jsonl"):
            handle.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, handle)
    return str(path)


def _dataset(records):
    """A Dataset of the records (every field of every record; Dataset.from_list keeps the first record's only)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})


def _shuffled(records):
    out = list(records)
    random.Random(3).shuffle(out)
    return out


def _one_changed(records):
    out = [dict(r) for r in records]
    out[7] = {**out[7], "id": "edited"}
    return out


# ---- the same pool in every form exports, and says it was verified ----


@pytest.mark.parametrize("form", ["json", "jsonl", "dataset", "saved_dataset", "tokenized"])
def test_the_scored_pool_exports_with_verified_row_identity(tmp_path, form):
    records = _records()
    scores = _scores(records)
    if form in ("json", "jsonl"):
        pool = _write(tmp_path / f"pool.{form}", records)
    elif form == "dataset":
        pool = _dataset(records)  # gains None for missing "image" fields: hashes alike
    elif form == "saved_dataset":
        _dataset(records).save_to_disk(str(tmp_path / "saved"))
        pool = str(tmp_path / "saved")
    else:  # the tokenized pool prepare_* returns carries its own record_hash column
        pool = Dataset.from_dict(
            {"input_ids": [[1, 2]] * N, "labels": [[1, 2]] * N, "record_hash": [record_hash(r) for r in records]}
        )
    out = export_selection(pool, scores, tmp_path / "export")
    meta = json.load(open(os.path.join(out, "selection.json")))
    assert meta["row_identity"].startswith("verified")
    chosen = [i for i, s in enumerate(scores["selected"]) if s]
    assert json.load(open(os.path.join(out, "indices.json"))) == chosen
    if form in ("json", "jsonl"):
        assert load_pool(os.path.join(out, f"pool_icons.{form}")).records == [records[i] for i in chosen]
    card = open(os.path.join(out, "README.md")).read()
    assert "| row identity | verified" in card and "not verified" not in card


# ---- a pool that is not the scored one is refused, naming the first wrong row ----


def _form(tmp_path, records, form):
    if form == "json":
        return _write(tmp_path / "pool.json", records)
    if form == "jsonl":
        return _write(tmp_path / "pool.jsonl", records)
    return _dataset(records)


def _first_bad_row(good, bad):
    return next(i for i, (g, b) in enumerate(zip(good, bad, strict=True)) if record_hash(g) != record_hash(b))


@pytest.mark.parametrize("form", ["json", "jsonl", "dataset"])
@pytest.mark.parametrize(
    "change, why",
    [
        (_shuffled, "in another order"),
        (_one_changed, "1 of the 12 scored rows hold other records"),
        (lambda r: r[::-1], "in another order"),
        (lambda r: _records(N, kind="chat"), "12 of the 12 scored rows hold other records"),
    ],
    ids=["shuffled", "one_record_changed", "reversed", "regenerated"],
)
def test_a_pool_that_is_not_the_scored_one_is_refused(tmp_path, form, change, why):
    records = _records()
    bad = change(records)
    row = _first_bad_row(records, bad)
    with pytest.raises(
        ValueError,
        match=rf"is not the pool the scores were computed on: row {row} holds record "
        rf"{record_hash(bad[row])} but the score table expects "
        rf"{record_hash(records[row])}; .*{why}.*original order",
    ):
        export_selection(_form(tmp_path, bad, form), _scores(records), tmp_path / "export")
    assert not (tmp_path / "export").exists()  # refused before writing anything


@pytest.mark.parametrize("form", ["json", "dataset"])
def test_a_shorter_or_longer_pool_is_refused(tmp_path, form):
    records = _records()
    with pytest.raises(
        ValueError,
        match=r"has 9 rows but the scores were computed on a pool of 12 rows \(row 9 on is "
        r"missing\)",
    ):
        export_selection(_form(tmp_path, records[:9], form), _scores(records), tmp_path / "export")
    # Without hashes the table's highest row still betrays a shorter pool.
    with pytest.raises(ValueError, match=r"has 9 rows but the score table refers to row 11"):
        export_selection(_form(tmp_path, records[:9], form), _scores(records, hashes=False), tmp_path / "export")
    # A longer pool: the provenance's pool size (written by compute_influence) refuses it.
    scores = _scores(records)
    scores.info.description = json.dumps({**json.loads(scores.info.description), "influence": {"pool_rows": N}})
    with pytest.raises(
        ValueError,
        match=r"has 14 rows but the scores were computed on a pool of 12 rows \(row 12 on "
        r"was added\)",
    ):
        export_selection(_form(tmp_path, records + _records(2), form), scores, tmp_path / "export")


def test_a_shuffled_tokenized_pool_is_refused(tmp_path):
    records = _records()
    hashes = [record_hash(r) for r in records]
    order = list(range(N))[::-1]
    pool = Dataset.from_dict({"input_ids": [[i] for i in order], "record_hash": [hashes[i] for i in order]})
    with pytest.raises(ValueError, match=r"row 0 holds record .* another order"):
        export_selection(pool, _scores(records), tmp_path / "export")


def test_a_table_without_hashes_exports_but_says_identity_was_not_verified(tmp_path, caplog):
    records = _records()
    pool = _write(tmp_path / "pool.json", records)
    with caplog.at_level(logging.WARNING, logger="icons_hf.export"):
        out = export_selection(pool, _scores(records, hashes=False), tmp_path / "export")
    assert any("Row identity not verified" in r.getMessage() for r in caplog.records)
    meta = json.load(open(os.path.join(out, "selection.json")))
    assert meta["row_identity"].startswith("not verified")
    card = open(os.path.join(out, "README.md")).read()
    assert "| row identity | not verified" in card and "**Row identity not verified**" in card
    # The same shuffled pool is not detected without hashes: that is exactly what the card warns about.
    export_selection(
        _write(tmp_path / "pool.json", _shuffled(records)), _scores(records, hashes=False), tmp_path / "export2"
    )


def test_record_hash_is_canonical(tmp_path):
    record = {"id": "x", "conversations": [{"from": "human", "value": "hi"}], "score": 1.0, "extra": None}
    assert record_hash(record) == record_hash(
        {"conversations": [{"value": "hi", "from": "human"}], "id": "x", "score": 1}
    )
    assert record_hash(record) != record_hash({**record, "id": "y"})
    assert len(record_hash(record)) == 16 and int(record_hash(record), 16) >= 0
    records = _records()
    assert dataset_record_hashes(_dataset(records)) == [record_hash(r) for r in records]
    with pytest.raises(TypeError, match="record object"):
        record_hash(["not", "a", "record"])
    with pytest.raises(TypeError, match=r"record\['x'\] is a type, which cannot be hashed as JSON"):
        record_hash({"x": object})


def test_prepare_datasets_add_the_record_hash_column():
    from icons_hf.data import prepare_chat_dataset, prepare_llava_dataset
    from icons_hf.testing import build_tokenizer

    llava = [r for r in _records() if "image" not in r]
    tok = build_tokenizer([t["value"] for r in llava for t in r["conversations"]])
    prepared = prepare_llava_dataset(llava, tok)
    assert list(prepared.with_format(None)["record_hash"]) == [record_hash(r) for r in llava]
    assert set(prepared[0]) == {"input_ids", "labels"}  # rows read hold the model inputs only

    from transformers import PreTrainedTokenizerFast

    chat = _records(4, kind="chat")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert isinstance(tok, PreTrainedTokenizerFast)
    for given in (chat, Dataset.from_list(chat)):
        prepared = prepare_chat_dataset(given, tok)
        assert list(prepared.with_format(None)["record_hash"]) == [record_hash(r) for r in chat]
        assert "record_hash" in prepared.column_names and set(prepared[0]) == {"input_ids", "labels"}


# ---- the output folder ----


def test_export_never_replaces_files_it_did_not_write(tmp_path):
    records = _records()
    pool = _write(tmp_path / "pool.json", records)
    target = tmp_path / "my_repo"
    target.mkdir()
    (target / "README.md").write_text("# my own card\n")
    with pytest.raises(
        FileExistsError,
        match=r"already holds README.md, which no icons_hf export wrote; export into "
        r"an empty or new folder",
    ):
        export_selection(pool, _scores(records), target)
    assert (target / "README.md").read_text() == "# my own card\n" and sorted(os.listdir(target)) == ["README.md"]
    # Unrelated files are left alone; a previous export is updated in place, and its old subset file goes.
    (target / "README.md").unlink()
    (target / "notes.txt").write_text("mine")
    export_selection(pool, _scores(records), target)
    assert (target / "pool_icons.json").is_file()
    export_selection(_dataset(records), _scores(records), target)
    assert not (target / "pool_icons.json").exists() and (target / "data").is_dir()
    assert (target / "notes.txt").read_text() == "mine"


def test_card_and_selection_json_hold_every_stage_setting(tmp_path):
    records = _records()
    scores = _scores(records)
    info = json.loads(scores.info.description)
    info["selection"]["settings"] = {"method": "vote", "fraction": 0.5, "threshold_inclusive": False, "seed": 0}
    scores.info.description = json.dumps(info)
    out = export_selection(_write(tmp_path / "pool.json", records), scores, tmp_path / "export")
    meta = json.load(open(os.path.join(out, "selection.json")))
    assert meta["selection"]["settings"]["threshold_inclusive"] is False
    card = open(os.path.join(out, "README.md")).read()
    assert "## Settings" in card and "| selection | `threshold_inclusive` | `false` |" in card
    # Without a settings dict, the settings fields the provenance records are shown.
    out = export_selection(_write(tmp_path / "pool.json", records), _scores(records), tmp_path / "export2")
    card = open(os.path.join(out, "README.md")).read()
    assert '| selection | `method` | `"vote"` |' in card and "| selection | `fraction` | `0.5` |" in card


@pytest.mark.parametrize(
    "kind, ext, fmt",
    [
        ("chat", "jsonl", "chat_jsonl"),
        ("chat", "json", "chat_json"),
        ("llava", "jsonl", "llava_jsonl"),
        ("llava", "json", "llava_json"),
    ],
)
def test_pool_format_is_detected_from_the_records(tmp_path, kind, ext, fmt):
    records = _records(kind=kind)
    out = export_selection(_write(tmp_path / f"pool.{ext}", records), _scores(records), tmp_path / "export")
    assert json.load(open(os.path.join(out, "selection.json")))["pool"]["format"] == fmt
    assert f"({fmt}, 12 rows)" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize(
    "inclusive, percentile, words",
    [
        (False, 80.0, "whose influence score exceeds that task's 80th percentile;"),
        (
            True,
            None,
            "whose influence score reaches that task's 80th percentile (100 x (1 - fraction), as the released code)",
        ),
    ],
)
def test_card_describes_the_vote_threshold_as_configured(tmp_path, inclusive, percentile, words):
    records = _records()
    scores = _scores(records)
    info = json.loads(scores.info.description)
    info["selection"].update(
        task_floor=0.0, settings={"threshold_inclusive": inclusive, "threshold_percentile": percentile}
    )
    scores.info.description = json.dumps(info)
    out = export_selection(_write(tmp_path / "pool.json", records), scores, tmp_path / "export")
    card = open(os.path.join(out, "README.md")).read()
    assert words in card
    assert ("| selection | `threshold_percentile` | none |" in card) == (percentile is None)


def table(**columns):
    n = len(next(iter(columns.values())))
    return Dataset.from_dict({"index": list(range(n)), **{f"influence_{k}": v for k, v in columns.items()}})


def _selection(n, chosen, tasks=("a",)):
    rng = np.random.default_rng(0)
    t = Dataset.from_dict({"index": list(range(n)), **{f"influence_{k}": rng.normal(size=n).tolist() for k in tasks}})
    scores = select(t, num_rows=len(chosen), method="task", task=tasks[0])
    sel = [i in chosen for i in range(n)]
    scores = scores.remove_columns("selected").add_column("selected", sel)
    return scores


def test_export_round_trips_hf_dataset(tmp_path):
    pool = Dataset.from_dict({"text": [f"row {i}" for i in range(10)], "label": list(range(10))})
    scores = select(table(a=[float(i % 4) for i in range(10)], b=[float(-i) for i in range(10)]), fraction=0.3)
    out = export_selection(pool, scores, tmp_path / "subset", license="cc-by-4.0")
    chosen = [i for i, s in enumerate(scores["selected"]) if s]
    reloaded = Dataset.from_parquet(str(tmp_path / "subset" / "data" / "train-00000-of-00001.parquet"))
    assert reloaded.to_list() == pool.select(chosen).to_list()
    assert json.load(open(os.path.join(out, "indices.json"))) == chosen
    table_back = Dataset.from_parquet(os.path.join(out, "scores.parquet"))
    assert table_back["selected"] == scores["selected"]
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(os.path.join(out, "README.md"))
    assert card.data.license == "cc-by-4.0"
    assert card.data.size_categories == ["n<1K"]
    assert "## Votes" in card.text and "wu2025icons" in card.text


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_export_llava_records_by_position_with_duplicate_ids(tmp_path, suffix):
    records = [{"id": f"id{i % 3}", "image": f"{i}.png", "conversations": [{"from": "human", "value": f"q{i}"},
               {"from": "gpt", "value": f"a{i}"}]} for i in range(9)]
    pool = tmp_path / f"pool{suffix}"
    with open(pool, "w") as handle:
        if suffix == ".json":
            json.dump(records, handle)
        else:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    scores = select(table(a=[0, 9, 1, 8, 2, 7, 3, 6, 4]), fraction=0.34, method="task", task="a")
    out = export_selection(str(pool), scores, tmp_path / "out")
    path = os.path.join(out, f"pool_icons{suffix}")
    with open(path) as handle:
        back = json.load(handle) if suffix == ".json" else [json.loads(line) for line in handle]
    assert back == [records[1], records[3], records[5]]
    meta = json.load(open(os.path.join(out, "selection.json")))
    assert meta["subset_file"] == f"pool_icons{suffix}" and meta["num_selected"] == 3


def test_export_refuses_wrong_pool_and_unselected_scores(tmp_path):
    pool = Dataset.from_dict({"x": [1, 2, 3]})
    with pytest.raises(ValueError, match="call icons_hf.select"):
        export_selection(pool, table(a=[1.0, 2.0, 3.0]), tmp_path / "a")
    with pytest.raises(ValueError, match="refers to row 4"):
        export_selection(pool, select(table(a=[1.0, 2, 3, 4, 5]), fraction=0.4), tmp_path / "b")
