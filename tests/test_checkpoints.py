"""compute_checkpoint_stores: one function for the callback's and the offline extraction, sub-pools, run files."""

import json
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import IconsCallback, compute_checkpoint_stores, compute_influence, load_gradients, load_run
from icons_hf.checkpoints import run_stores
from icons_hf.settings import FeatureSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(path) -> np.ndarray:
    data = load_gradients(path).with_format("numpy", columns=["index", "features"])
    return np.asarray(data["features"], dtype=np.float64)


def _train(tmp_path, model, rows, pool, tasks, **kwargs):
    from transformers import Trainer, TrainingArguments

    from icons_hf.data import IconsCollator

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
        learning_rate=1e-2, report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0,
        logging_steps=1,
    )
    callback = IconsCallback(pool, tasks, str(tmp_path / "icons"), show_progress=False, **kwargs)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=IconsCollator(0),
            callbacks=[callback]).train()
    return callback


def test_callback_and_offline_extraction_write_the_same_stores(tmp_path, tiny_lora_llama, token_rows):
    from peft import PeftModel

    pool_rows = token_rows(11, seed=4)
    pool = Dataset.from_list(pool_rows)
    parts = {"long": pool.select(range(6)), "short": pool.select(range(6, 11))}
    tasks = {"t1": Dataset.from_list(token_rows(5, seed=5)), "t2": {"s1": Dataset.from_list(token_rows(3, seed=6))}}
    settings = FeatureSettings(train_feature="adam", dim=64, dtype="float32", batch_size=3, shard_size=4)

    # In training: the pool as two sub-pools, one store each.
    callback = _train(tmp_path, tiny_lora_llama(seed=0), token_rows(8, seed=3), parts, tasks, settings=settings)
    (live,) = callback.checkpoints
    assert live["checkpoint"] == "checkpoint-2" and live["step"] == 2
    assert [os.path.relpath(p, tmp_path / "icons") for p in live["train"]] == [
        os.path.join("checkpoint-2", "train", "long"), os.path.join("checkpoint-2", "train", "short")]
    assert load_run(tmp_path / "icons") == callback.stores() == run_stores([live])

    # Offline, from the saved checkpoint folder: name, step, learning rate and optimizer.pt are read from it.
    ckpt = tmp_path / "run" / "checkpoint-2"
    model = PeftModel.from_pretrained(tiny_lora_llama(seed=0).get_base_model(), str(ckpt), is_trainable=True)
    offline = compute_checkpoint_stores(model, pool, tasks, tmp_path / "offline", settings=settings,
                                        checkpoint=str(ckpt), show_progress=False)
    trainer_state = json.load(open(ckpt / "trainer_state.json"))
    logged_lr = [e["learning_rate"] for e in trainer_state["log_history"] if e.get("step") == 2][0]
    assert offline["checkpoint"] == "checkpoint-2" and offline["step"] == 2
    assert offline["learning_rate"] == pytest.approx(logged_lr) == live["learning_rate"]
    assert isinstance(offline["train"], str) and set(offline["tasks"]) == {"t1", "t2"}
    assert load_run(tmp_path / "offline") == run_stores([offline])

    # The sub-pools' stores, in order, hold the single pool's features (a row's feature ignores its neighbours).
    split = np.concatenate([_features(p) for p in live["train"]])
    whole = _features(offline["train"])
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    np.testing.assert_allclose(_features(live["tasks"]["t2"]["s1"]), _features(offline["tasks"]["t2"]["s1"]),
                               rtol=1e-5, atol=1e-6)
    meta = json.load(open(os.path.join(offline["train"], "store.json")))
    assert meta["settings"] == settings.to_dict() and meta["feature"] == "adam"

    # Both runs score the pool the same way: sub-pools are one pool, in order.
    a = compute_influence(*load_run(tmp_path / "icons"))
    b = compute_influence(*load_run(tmp_path / "offline"))
    assert a["index"] == b["index"] == list(range(11))
    np.testing.assert_allclose(np.asarray(a["influence_t1"]), np.asarray(b["influence_t1"]), atol=1e-4)


def test_run_file_keeps_one_entry_per_checkpoint_in_order(tmp_path, tiny_lora_llama, token_rows):
    model = tiny_lora_llama(seed=0)
    pool = Dataset.from_list(token_rows(4, seed=1))
    tasks = {"t": Dataset.from_list(token_rows(2, seed=2))}
    kw = dict(settings={"dim": 16, "shard_size": 2}, show_progress=False)
    first = compute_checkpoint_stores(model, pool, tasks, tmp_path, checkpoint="checkpoint-1", learning_rate=1.0, **kw)
    second = compute_checkpoint_stores(model, pool, tasks, tmp_path, checkpoint="checkpoint-3", learning_rate=0.5, **kw)
    again = compute_checkpoint_stores(model, pool, tasks, tmp_path, checkpoint="checkpoint-1", learning_rate=1.0, **kw)
    assert again == first and first["step"] == 1 and second["step"] == 3
    run = json.load(open(tmp_path / "icons_run.json"))
    assert [c["checkpoint"] for c in run["checkpoints"]] == ["checkpoint-3", "checkpoint-1"]
    assert load_run(tmp_path) == run_stores([second, first])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {"projection": "countsketch", "dim": 8192, "train_feature": "sgd"}),
        ({"preset": "paper"}, {"projection": "rademacher", "dim": 5120, "train_feature": "sgd"}),
        ({"preset": "paper", "dim": 64}, {"projection": "rademacher", "dim": 64}),
        ({"settings": FeatureSettings(dim=32), "seed": 3}, {"dim": 32, "seed": 3}),
    ],
)
def test_callback_and_compute_gradients_take_their_defaults_from_the_settings(tmp_path, tiny_lora_llama, token_rows,
                                                                            kwargs, expected):
    from icons_hf import compute_gradients

    pool = Dataset.from_list(token_rows(3, seed=1))
    callback = IconsCallback(pool, {"t": pool}, **kwargs)
    assert {k: getattr(callback.settings, k) for k in expected} == expected
    if expected["dim"] <= 64:
        path = compute_gradients(tiny_lora_llama(seed=0), pool, output_dir=tmp_path / "s", show_progress=False,
                                 **kwargs)
        meta = json.load(open(os.path.join(path, "store.json")))
        assert {k: meta["settings"][k] for k in expected} == expected and meta["dim"] == expected["dim"]


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "paper", "dim": 16, "shard_size": 2},
     {"settings": {"projection": "rademacher", "shard_size": 2}, "dim": 16},
     {"projection": "rademacher", "dim": 16, "shard_size": 2}],
)
def test_compute_checkpoint_stores_takes_settings_in_every_style(tmp_path, tiny_lora_llama, token_rows, kwargs):
    pool = Dataset.from_list(token_rows(3, seed=1))
    entry = compute_checkpoint_stores(tiny_lora_llama(seed=0), pool, {"t": pool}, tmp_path, checkpoint="checkpoint-1",
                                      show_progress=False, **kwargs)
    for path in (entry["train"], entry["tasks"]["t"]):
        meta = json.load(open(os.path.join(path, "store.json")))
        assert (meta["settings"]["projection"], meta["settings"]["dim"], meta["dim"]) == ("rademacher", 16, 16)
    with pytest.raises(TypeError, match="FeatureSettings has no setting 'dims'"):
        compute_checkpoint_stores(tiny_lora_llama(seed=0), pool, {"t": pool}, tmp_path, checkpoint="c", dims=3)


def test_checkpoint_name_is_required_and_checked(tmp_path, tiny_lora_llama, token_rows):
    pool = Dataset.from_list(token_rows(3, seed=1))
    model = tiny_lora_llama(seed=0)
    with pytest.raises(ValueError, match="checkpoint= is needed"):
        compute_checkpoint_stores(model, pool, {"t": pool}, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        compute_checkpoint_stores(model, pool, {"t": pool}, tmp_path, checkpoint=str(tmp_path / "nope" / "ckpt-1"))
    with pytest.raises(ValueError, match="task name 'train' is the folder of the pool's store"):
        compute_checkpoint_stores(model, pool, {"train": pool}, tmp_path, checkpoint="c")
    with pytest.raises(ValueError, match="sub-pool name 'a b' may only use"):
        compute_checkpoint_stores(model, {"a b": pool}, {"t": pool}, tmp_path, checkpoint="c")


@pytest.mark.parametrize(
    "log_history, expected",
    [
        ([{"step": 4, "learning_rate": 0.25}, {"step": 8, "learning_rate": 0.5}], 0.5),  # logged at its own step
        ([{"step": 4, "learning_rate": 0.25}], None),  # only another step: never borrowed
        ([], None),  # nothing logged (logging_steps does not divide save_steps)
    ],
)
def test_checkpoint_learning_rate_is_the_checkpoints_own_or_none_with_a_warning(tmp_path, caplog, log_history,
                                                                                 expected):
    from icons_hf.gradients.precondition import checkpoint_learning_rate

    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": log_history}))
    with caplog.at_level("WARNING"):
        rate = checkpoint_learning_rate(folder)
    assert rate == expected
    warned = [r.getMessage() for r in caplog.records if "no learning rate for this checkpoint" in r.getMessage()]
    assert bool(warned) == (expected is None)
    if warned:
        assert "step 8" in warned[0] and "learning_rate=" in warned[0]


def test_influence_warns_when_several_checkpoints_fall_back_to_equal_weights(tmp_path, caplog):
    from icons_hf.testing import write_store

    rng = np.random.default_rng(0)
    train = [write_store(tmp_path / f"t{c}", rng.normal(size=(6, 4)), weights=f"w{c}") for c in range(2)]
    val = [write_store(tmp_path / f"v{c}", rng.normal(size=(2, 4)), weights=f"w{c}") for c in range(2)]
    with caplog.at_level("WARNING"):
        compute_influence(train, {"t": val}, specialist="mean", cache_file_name=str(tmp_path / "scores.arrow"))
    assert any("weighted equally" in r.getMessage() for r in caplog.records)
