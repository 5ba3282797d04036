"""Wrong inputs to feature extraction and the callback: refused early (before the warmup's first step), with a
message naming the dataset / column / row / argument and the fix, or handled (columns that are not model inputs)."""

import json
import logging
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import IconsCallback, compute_checkpoint_stores, compute_gradients, load_gradients
from icons_hf.store import iter_store_batches, read_store_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(token_rows, n=4, seed=1):
    return Dataset.from_list(token_rows(n, seed=seed))


def _bad_datasets(token_rows):
    rows = token_rows(3, seed=2)
    return {
        "list of dicts": (rows, TypeError, r"tasks\['x'\] is a list; pass a datasets.Dataset, e.g. Dataset.from_list"),
        "no labels": (Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows]), ValueError,
                      r"tasks\['x'\] lacks column\(s\) labels"),
        "float ids": (Dataset.from_list([{**r, "input_ids": [float(t) for t in r["input_ids"]]} for r in rows]),
                      TypeError, r"tasks\['x'\]: column 'input_ids' holds list<item: double>.*integer token ids"),
        "labels shorter": (Dataset.from_list([{**r, "labels": r["labels"][:-1]} if i == 1 else r
                                              for i, r in enumerate(rows)]),
                           ValueError, r"tasks\['x'\]: row 1 has \d+ labels but \d+ input_ids"),
        "text ids": (Dataset.from_list([{**r, "input_ids": " ".join(map(str, r["input_ids"]))} for r in rows]),
                     TypeError, r"column 'input_ids' holds string"),
        "unsupervised row": (Dataset.from_list([{**r, "labels": [-100] * len(r["labels"])} if i == 2 else r
                                                for i, r in enumerate(rows)]),
                             ValueError, r"tasks\['x'\]: row 2: no supervised tokens .* on_bad_row='skip'"),
    }


@pytest.mark.parametrize(
    "case", ["list of dicts", "no labels", "float ids", "labels shorter", "text ids", "unsupervised row"])
def test_bad_validation_set_is_refused_when_the_callback_is_built(token_rows, case):
    data, error, message = _bad_datasets(token_rows)[case]
    with pytest.raises(error, match=message):
        IconsCallback(_rows(token_rows), {"x": data})


@pytest.mark.parametrize(
    ("pool", "tasks", "error", "message"),
    [
        ("list", {"x": "ok"}, TypeError, r"pool is a list; pass a datasets.Dataset"),
        ("ok", [("x", "ok")], ValueError, "tasks must be a non-empty mapping"),
        ("ok", {"x": {}}, ValueError, "task 'x' is an empty mapping"),
        ("ok", {"train": "ok"}, ValueError, "task name 'train' is the folder of the pool's store"),
        ("ok", {"x": {"a/b": "ok"}}, ValueError, "subtask name 'a/b' may only use"),
        ({"img": "ok", "": "ok"}, {"x": "ok"}, ValueError, "sub-pool name '' may only use"),
    ],
)
def test_bad_pool_or_task_names_are_refused_when_the_callback_is_built(token_rows, pool, tasks, error, message):
    ok = _rows(token_rows)

    def fill(value):
        if value == "ok":
            return ok
        if value == "list":
            return token_rows(2)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return [(k, fill(v)) for k, v in value] if isinstance(value, list) else value

    with pytest.raises(error, match=message):
        IconsCallback(fill(pool), fill(tasks))


def test_text_and_unknown_columns_are_left_out_of_the_model_call(tmp_path, tiny_lora_llama, token_rows, caplog):
    rows = token_rows(6, seed=3)
    plain = Dataset.from_list(rows)
    extra = Dataset.from_list([{**r, "id": f"row-{i}", "record_hash": f"{i:064x}", "source": "chat", "length": len(r[
        "input_ids"])} for i, r in enumerate(rows)])
    model = tiny_lora_llama(seed=0)
    kw = dict(dim=32, dtype="float32", batch_size=4, show_progress=False)
    reference = compute_gradients(model, plain, output_dir=tmp_path / "plain", **kw)
    with caplog.at_level(logging.INFO, logger="icons_hf"):
        path = compute_gradients(model, extra, output_dir=tmp_path / "extra", **kw)
    store, ref = load_gradients(path), load_gradients(reference)
    np.testing.assert_array_equal(np.asarray(store["features"]), np.asarray(ref["features"]))
    assert store["record_hash"] == [f"{i:064x}" for i in range(6)] and "record_hash" not in ref.column_names
    assert read_store_metadata(path)["record_hash"] is True and read_store_metadata(reference)["record_hash"] is False
    left_out = [r.getMessage() for r in caplog.records if "left out of the model inputs" in r.getMessage()]
    # Each column once (two batches were read), with the reason.
    assert sorted(m.split("'")[1] for m in left_out) == ["id", "length", "record_hash", "source"], left_out
    assert any("'length'" in m and "forward does not take it" in m for m in left_out)

    # A dataset whose format shows the model inputs only still gives its record hashes to the store.
    shown = extra.with_format(columns=["input_ids", "labels"])
    formatted = load_gradients(compute_gradients(model, shown, output_dir=tmp_path / "formatted", **kw))
    assert formatted["record_hash"] == store["record_hash"]
    np.testing.assert_array_equal(np.asarray(formatted["features"]), np.asarray(ref["features"]))


def test_record_hash_column_of_another_type_is_refused(tmp_path, tiny_lora_llama, token_rows):
    data = Dataset.from_list([{**r, "record_hash": i} for i, r in enumerate(token_rows(3))])
    with pytest.raises(TypeError, match=r"column 'record_hash' holds int64; it must hold one string per row"):
        compute_gradients(tiny_lora_llama(), data, output_dir=tmp_path / "s", dim=8, show_progress=False)


def _trainer(tmp_path, tiny_lora_llama, token_rows, callback, **arguments):
    from transformers import Trainer, TrainingArguments

    from icons_hf.data import IconsCollator

    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, save_steps=1,
                    report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    settings.update(arguments)
    steps = []

    class Steps(__import__("transformers").TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = Trainer(model=tiny_lora_llama(seed=0), args=TrainingArguments(**settings),
                      train_dataset=_rows(token_rows, 4, seed=9), data_collator=IconsCollator(0),
                      callbacks=[callback, Steps()])
    return trainer, steps


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unbatchable column", r"pool: its first rows cannot be batched for LlamaForCausalLM \(column 'position_ids' "
                               r"is missing \(None\)"),
        ("no checkpoints", r"save_strategy='no'\) saves no checkpoint"),
        ("adam feature with sgd", r"train_feature='adam' needs an Adam/AdamW optimizer, but the Trainer's is SGD"),
        ("row too long", r"pool: row 3: 70 tokens exceed the model's limit of 64; pass max_length <= 64"),
    ],
)
def test_setup_that_would_fail_at_the_first_checkpoint_is_refused_before_the_first_step(tmp_path, tiny_lora_llama,
                                                                                       token_rows, case, message):
    rows = token_rows(4, seed=1)
    pool, arguments, kwargs = Dataset.from_list(rows), {}, {}
    if case == "unbatchable column":
        pool = Dataset.from_list([{**r, "position_ids": list(range(len(r["input_ids"]))) if i else None}
                                  for i, r in enumerate(rows)])
    elif case == "row too long":
        pool = Dataset.from_list(rows[:3] + [{"input_ids": [1] * 70, "labels": [1] * 70}])
    elif case == "no checkpoints":
        arguments = dict(save_strategy="no")
    else:
        arguments, kwargs = dict(optim="sgd"), dict(train_feature="adam")
    callback = IconsCallback(pool, {"t": _rows(token_rows, 2)}, str(tmp_path / "icons"), dim=8, **kwargs)
    trainer, steps = _trainer(tmp_path, tiny_lora_llama, token_rows, callback, **arguments)
    with pytest.raises(ValueError, match=message):  # BadRowError is a ValueError
        trainer.train()
    assert steps == [] and not os.path.exists(tmp_path / "icons")


def test_extraction_in_a_trainer_run_is_announced(tmp_path, tiny_lora_llama, token_rows, caplog):
    pool = {"a": _rows(token_rows, 3, seed=1), "b": _rows(token_rows, 2, seed=2)}
    callback = IconsCallback(pool, {"t": _rows(token_rows, 2, seed=3)}, str(tmp_path / "icons"), dim=8,
                             show_progress=False)
    trainer, steps = _trainer(tmp_path, tiny_lora_llama, token_rows, callback, max_steps=1)
    with caplog.at_level(logging.INFO, logger="icons_hf"):
        trainer.train()
    assert steps == [0]
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ICONS features for")]
    assert announced == [f"ICONS features for checkpoint-1: 5 pool rows in 2 store(s), 1 validation store(s), under "
                         f"{tmp_path / 'icons' / 'checkpoint-1'}"]


def test_a_loaded_store_is_accepted_where_a_store_path_is_expected(tmp_path, tiny_lora_llama, token_rows):
    path = compute_gradients(tiny_lora_llama(), _rows(token_rows, 5), output_dir=tmp_path / "s", dim=8,
                             dtype="float32", show_progress=False)
    loaded = load_gradients(path)
    again = load_gradients(loaded)
    assert again["index"] == loaded["index"] == list(range(5))
    assert read_store_metadata(loaded)["num_rows"] == 5
    assert np.concatenate([i for i, _, _ in iter_store_batches(loaded, batch_size=2)]).tolist() == list(range(5))
    with pytest.raises(TypeError, match=r"path is a dict; pass the folder of a gradient store"):
        read_store_metadata({"store": path})
    with pytest.raises(TypeError, match=r"path is a Dataset; pass the folder of a gradient store"):
        load_gradients(_rows(token_rows))


@pytest.mark.parametrize("main", [True, False])
def test_per_row_skip_warnings_come_from_the_main_process_only(tmp_path, tiny_lora_llama, token_rows, caplog,
                                                               monkeypatch, main):
    import icons_hf.gradients.badrows as badrows
    import icons_hf.gradients.extractor as extractor

    monkeypatch.setattr(badrows, "is_main_process", lambda: main)
    monkeypatch.setattr(extractor, "is_main_process", lambda: main)
    rows = token_rows(4, seed=1)
    rows[2] = {**rows[2], "labels": [-100] * len(rows[2]["labels"])}
    with caplog.at_level(logging.DEBUG, logger="icons_hf"):
        path = compute_gradients(tiny_lora_llama(), Dataset.from_list(rows), output_dir=tmp_path / "s", dim=8,
                                 on_bad_row="skip", show_progress=False)
    skipped = [r for r in caplog.records if r.getMessage().startswith("Skipping row 2: no supervised tokens")]
    assert [r.levelno for r in skipped] == [logging.WARNING if main else logging.DEBUG]
    assert [s["index"] for s in json.load(open(os.path.join(path, "store.json")))["skipped"]] == [2]


def test_compute_checkpoint_stores_refuses_a_list_as_pool(tmp_path, tiny_lora_llama, token_rows):
    with pytest.raises(TypeError, match=r"pool is a list; pass a datasets.Dataset, e.g. Dataset.from_list\(rows\)"):
        compute_checkpoint_stores(tiny_lora_llama(), token_rows(3), {"t": _rows(token_rows)}, tmp_path,
                                  checkpoint="checkpoint-1")
