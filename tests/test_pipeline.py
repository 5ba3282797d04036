"""End-to-end checks of the pipeline: influence, consensus, export, callback, offline extraction, CLI, demo."""

import json
import logging
import math
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import IconsCallback, compute_gradients, compute_influence, export_selection, load_gradients, select
from icons_hf.testing import write_store


def brute_force_influence(train, val, weights):
    """sum_c w_c mean_v cos(g_z^c, g_v^c), one row and one validation example at a time."""
    out = np.zeros(len(train[0]))
    for z in range(len(train[0])):
        for c, w in enumerate(weights):
            total = 0.0
            for v in val[c]:
                g = train[c][z]
                total += float(np.dot(g, v) / (np.linalg.norm(g) * np.linalg.norm(v)))
            out[z] += w * total / len(val[c])
    return out


def test_influence_matches_brute_force_with_checkpoints_and_subtasks(tmp_path):
    rng = np.random.default_rng(1234)
    n, dim = 23, 6
    train = [rng.normal(size=(n, dim)) for _ in range(2)]
    lrs = [3e-4, 1e-4]
    paths = [
        write_store(tmp_path / f"train{c}", train[c], learning_rate=lrs[c], checkpoint=f"ckpt-{c}", weights=f"w{c}")
        for c in range(2)
    ]
    val = {name: [rng.normal(size=(k, dim)) for _ in range(2)] for name, k in (("a", 5), ("b1", 3), ("b2", 4))}
    vpaths = {
        name: [write_store(tmp_path / f"{name}{c}", val[name][c], weights=f"w{c}") for c in range(2)] for name in val
    }
    scores = compute_influence(
        paths, {"a": vpaths["a"], "b": {"b1": vpaths["b1"], "b2": vpaths["b2"]}}, specialist="mean"
    )
    weights = [lr / sum(lrs) for lr in lrs]
    expected_a = brute_force_influence(train, val["a"], weights)
    expected_b = np.maximum(
        brute_force_influence(train, val["b1"], weights), brute_force_influence(train, val["b2"], weights)
    )
    assert scores.column_names == ["index", "influence_a", "influence_b"]
    np.testing.assert_array_equal(scores["index"], np.arange(n))
    np.testing.assert_allclose(scores["influence_a"], expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["influence_b"], expected_b, rtol=1e-5, atol=1e-6)
    # Explicit weights override the recorded learning rates.
    equal = compute_influence(paths, {"a": vpaths["a"]}, checkpoint_weights=[1, 1], specialist="mean")
    np.testing.assert_allclose(
        equal["influence_a"], brute_force_influence(train, val["a"], [0.5, 0.5]), rtol=1e-5, atol=1e-6
    )


def test_influence_refuses_mismatched_stores(tmp_path):
    rng = np.random.default_rng(0)
    train = write_store(tmp_path / "train", rng.normal(size=(4, 6)))
    other_dim = write_store(tmp_path / "val8", rng.normal(size=(3, 8)))
    with pytest.raises(ValueError, match="projection"):
        compute_influence(train, {"t": other_dim})
    other_ckpt = write_store(tmp_path / "val_other", rng.normal(size=(3, 6)), weights="elsewhere")
    with pytest.raises(ValueError, match="other model weights"):
        compute_influence(train, {"t": other_ckpt})
    with pytest.raises(ValueError, match="one validation store per checkpoint"):
        compute_influence(train, {"t": [other_ckpt, other_ckpt]})


def table(**columns):
    n = len(next(iter(columns.values())))
    return Dataset.from_dict({"index": list(range(n)), **{f"influence_{k}": v for k, v in columns.items()}})


def test_vote_selection_worked_by_hand():
    # The paper's rule (no per-task floor). tau = 60th percentile of [1..5] = 3.4 for both tasks;
    # votes = [1, 2, 1, 0, 0].
    scores = select(table(a=[5, 4, 3, 2, 1], b=[1, 5, 4, 3, 2]), fraction=0.4, threshold_percentile=60, task_floor=0.0)
    assert scores["votes"] == [1, 2, 1, 0, 0]
    # Row 1 has two votes; rows 0 and 2 tie at one vote. Mean percentile rank: row 0 (1.0 + 0.0) / 2 = 0.5,
    # row 2 (0.5 + 0.75) / 2 = 0.625, so row 2 wins the tie.
    assert scores["selected"] == [False, True, True, False, False]
    np.testing.assert_allclose(scores["tiebreak"], [0.5, 0.875, 0.625, 0.375, 0.125])
    info = json.loads(scores.info.description)["selection"]
    assert info["num_selected"] == 2 and info["thresholds"] == {"a": pytest.approx(3.4), "b": pytest.approx(3.4)}


def test_default_vote_gives_every_task_its_floor_worked_by_hand(caplog):
    # Default: the whole subset is per-task floors, tasks taking turns. 2 rows, 2 tasks -> 1 row each: task a's best
    # is row 0, task b's best is row 1 (the paper's rule keeps rows 1 and 2, see above).
    t = table(a=[5, 4, 3, 2, 1], b=[1, 5, 4, 3, 2])
    scores = select(t, fraction=0.4, threshold_percentile=60)
    assert scores["selected"] == [True, True, False, False, False]
    info = json.loads(scores.info.description)["selection"]
    assert info["task_floor"] == 1.0 and info["floor_rows_per_task"] == 1
    # Task b's best row is also task a's second best: a row wanted by both counts once, so with 4 rows task a takes
    # rows 0 and 1 while task b, whose best is taken, moves to its next best rows 2 and 3.
    t = table(a=[5, 4, 3, 2, 1, 0], b=[0, 5, 4, 3, 2, 1])
    assert select(t, num_rows=4)["selected"] == [True, True, True, True, False, False]
    # 3 rows over 2 tasks: 1 floor row each (rows 0 and 3); the last row goes by votes among the rest. tau = 4 for
    # both tasks, so rows 1, 2, 4, 5 have no vote and the same mean percentile rank 0.5: the lowest index, row 1.
    t = table(a=[5, 4, 3, 0, 1, 2], b=[0, 1, 2, 5, 4, 3])
    scores = select(t, num_rows=3)
    assert scores["votes"] == [1, 0, 0, 1, 0, 0]
    assert scores["selected"] == [True, True, False, True, False, False]
    # Fewer rows than tasks: no floor row, the votes decide, and the log says so.
    with caplog.at_level(logging.WARNING, logger="icons_hf.consensus"):
        few = select(table(a=[5, 4, 3], b=[3, 4, 5], c=[1, 5, 2]), num_rows=2)
    assert "reserves no row" in caplog.text
    assert json.loads(few.info.description)["selection"]["floor_rows_per_task"] == 0
    no_floor = select(table(a=[5, 4, 3], b=[3, 4, 5], c=[1, 5, 2]), num_rows=2, task_floor=0.0)
    assert few["selected"] == no_floor["selected"]
    # Other methods keep no floor unless asked.
    assert json.loads(select(t, num_rows=3, method="mean").info.description)["selection"]["task_floor"] == 0.0


def test_full_ties_fall_back_to_row_index():
    for floor in (0.0, None):
        scores = select(table(a=[1.0] * 4, b=[2.0] * 4), fraction=0.5, task_floor=floor)
        assert scores["votes"] == [0, 0, 0, 0]
        assert scores["selected"] == [True, True, False, False]


def test_fraction_and_threshold_are_separate_settings():
    rng = np.random.default_rng(7)
    t = table(a=rng.normal(size=37).tolist(), b=rng.normal(size=37).tolist(), c=rng.normal(size=37).tolist())
    for fraction in (0.05, 0.2, 0.5, 1.0):
        for pct in (50, 80, 95):
            s = select(t, fraction=fraction, threshold_percentile=pct, task_floor=0.0)
            assert sum(s["selected"]) == math.floor(fraction * 37)
            mat = np.stack([np.asarray(t[c]) for c in ("influence_a", "influence_b", "influence_c")], 1)
            expected_votes = (mat > np.percentile(mat, pct, axis=0)).sum(1)
            assert s["votes"] == expected_votes.tolist()
            # No unselected row has more votes than a selected one.
            sel = np.asarray(s["selected"])
            if sel.any() and (~sel).any():
                assert expected_votes[sel].min() >= expected_votes[~sel].max()


def test_other_aggregations_worked_by_hand():
    t = table(a=[0.0, 10.0, 1.0, 3.0], b=[4.0, -10.0, 2.0, 0.0])
    # mean = [2, 0, 1.5, 1.5] -> row 0
    assert select(t, fraction=0.25, method="mean")["selected"] == [True, False, False, False]
    # max = [4, 10, 2, 3] -> row 1
    assert select(t, fraction=0.25, method="max")["selected"] == [False, True, False, False]
    # percentile ranks a = [0, 1, 1/3, 2/3], b = [1, 0, 2/3, 1/3]; mean = [.5, .5, .5, .5] -> tie -> row 0
    assert select(t, fraction=0.25, method="rank")["selected"] == [True, False, False, False]
    # z-scores: a mean 3.5 std ~3.905; b mean -1 std ~5.612; mean z = [0.0, 0.0, 0.0, 0.0] up to rounding
    # -> check values
    norm = select(t, fraction=0.5, method="norm")
    za = (np.array([0, 10, 1, 3]) - 3.5) / np.std([0, 10, 1, 3])
    zb = (np.array([4, -10, 2, 0]) + 1) / np.std([4, -10, 2, 0])
    np.testing.assert_allclose(norm["consensus"], (za + zb) / 2, rtol=1e-6, atol=1e-6)
    assert select(t, fraction=0.5, method="task", task="b")["selected"] == [True, False, True, False]
    with pytest.raises(ValueError, match="task= one of: a, b"):
        select(t, method="task", task="c")
    r1, r2 = select(t, fraction=0.5, method="random", seed=3), select(t, fraction=0.5, method="random", seed=3)
    assert r1["selected"] == r2["selected"] and sum(r1["selected"]) == 2
    with pytest.raises(ValueError, match="method='bogus'"):
        select(t, method="bogus")


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


def _train_with_callback(tmp_path, model, rows, pool, tasks, **callback_kwargs):
    from transformers import Trainer, TrainingArguments

    from icons_hf.data import IconsCollator

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
        learning_rate=1e-2, lr_scheduler_type="linear", report_to="none", use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, seed=0,
    )
    callback = IconsCallback(pool, tasks, str(tmp_path / "icons"), **callback_kwargs)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=IconsCollator(0),
            callbacks=[callback]).train()
    return callback


def test_callback_stores_match_offline_extraction_from_checkpoint(tmp_path, tiny_lora_llama, token_rows):
    import torch
    from peft import PeftModel

    rows = token_rows(16, seed=3)
    pool = Dataset.from_list(token_rows(11, seed=4))
    tasks = {"t1": Dataset.from_list(token_rows(5, seed=5)), "t2": {"s1": Dataset.from_list(token_rows(3, seed=6)),
                                                                    "s2": Dataset.from_list(token_rows(4, seed=7))}}
    model = tiny_lora_llama(seed=0)
    callback = _train_with_callback(tmp_path, model, rows, pool, tasks, dim=128, dtype="float32", batch_size=3,
                                    train_feature="adam")
    train_paths, task_paths = callback.stores()
    assert [c["checkpoint"] for c in callback.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert set(task_paths) == {"t1", "t2"} and set(task_paths["t2"]) == {"s1", "s2"}
    ckpt = tmp_path / "run" / "checkpoint-2"
    trainer_state = json.load(open(ckpt / "trainer_state.json"))
    logged_lr = [e["learning_rate"] for e in trainer_state["log_history"] if e.get("step") == 2][0]
    meta = json.load(open(os.path.join(train_paths[0], "store.json")))
    assert meta["learning_rate"] == pytest.approx(logged_lr) and meta["checkpoint"] == "checkpoint-2"

    # Offline: rebuild the base model, load the checkpoint's adapter and optimizer.pt, extract again.
    base = tiny_lora_llama(seed=0).get_base_model()
    offline = PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
    path = compute_gradients(offline, pool, output_dir=tmp_path / "offline", feature="adam", optimizer_state=str(ckpt),
                             dim=128, dtype="float32", batch_size=5)
    live = np.asarray(load_gradients(train_paths[0])["features"])
    again = np.asarray(load_gradients(path)["features"])
    # Same features up to float32 rounding (other batch size, weights reloaded from safetensors).
    np.testing.assert_allclose(again, live, rtol=1e-5, atol=1e-5 * np.abs(live).max())
    assert json.load(open(os.path.join(path, "store.json")))["learning_rate"] == pytest.approx(logged_lr)
    assert torch.is_grad_enabled()

    scores = select(compute_influence(train_paths, task_paths), fraction=0.5)
    assert sum(scores["selected"]) == 5 and len(scores) == 11


def test_cli_influence_select_export(tmp_path, capsys):
    from icons_hf.cli import main

    rng = np.random.default_rng(5)
    train = write_store(tmp_path / "train", rng.normal(size=(12, 6)))
    a = write_store(tmp_path / "a", rng.normal(size=(3, 6)))
    b = write_store(tmp_path / "b", rng.normal(size=(4, 6)))
    scores_dir, out = str(tmp_path / "scores"), str(tmp_path / "out")
    assert main(["influence", "--train", train, "--task", f"a={a}", "--task", f"b={b}", "--output", scores_dir]) == 0
    assert main(["select", str(tmp_path / "scores"), "--fraction", "0.25", "--output", str(tmp_path / "selected")]) == 0
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"id": str(i), "conversations": []} for i in range(12)]))
    assert main(["export", "--pool", str(pool), "--scores", str(tmp_path / "selected"), "--output-dir", out]) == 0
    assert len(json.load(open(tmp_path / "out" / "pool_icons.json"))) == 3
    # Same result as the Python API.
    api = select(compute_influence(train, {"a": a, "b": b}), fraction=0.25)
    assert [i for i, s in enumerate(api["selected"]) if s] == json.load(open(tmp_path / "out" / "indices.json"))
    # Bad input gives an error message, not a traceback.
    assert main(["select", scores_dir, "--method", "task", "--task", "zzz", "--output", str(tmp_path / "x")]) == 2
    assert "task= one of: a, b" in capsys.readouterr().err


def test_demo_pipeline_on_reduced_size(tmp_path):
    pytest.importorskip("easy_vqa", reason="the demo extra (easy-vqa) is part of the test extra; install .[test]")
    from icons_hf.demo import DemoConfig, format_summary, run_demo

    summary = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), pool_size=120, validation_per_task=6, dim=256,
                                  warmup_epochs=2))
    assert summary["selected_rows"] == 24 and summary["pool_rows"] == 120
    assert sum(summary["selected_by_task"].values()) == 24
    assert sum(h["selected"] for h in summary["vote_histogram"].values()) == 24
    subset = json.load(open(os.path.join(summary["subset_dir"], "pool_icons.json")))
    pool = json.load(open(tmp_path / "demo" / "pool.json"))
    indices = json.load(open(os.path.join(summary["subset_dir"], "indices.json")))
    assert subset == [pool[i] for i in indices]
    assert "Selected 24 of 120" in format_summary(summary)


def test_text_only_llava_pool_has_only_model_inputs(tmp_path, tiny_lora_llama):
    from icons_hf.data import prepare_llava_dataset
    from icons_hf.testing import build_tokenizer

    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"what is {i}?"},
                                                {"from": "gpt", "value": "a number"}]} for i in range(5)]
    tokenizer = build_tokenizer(["what is a number ?"] + [str(i) for i in range(5)])
    pool = prepare_llava_dataset(records, tokenizer)
    # The record_hash column (row identity for export) stays in the table; rows read hold the model inputs only.
    assert pool.column_names == ["input_ids", "labels", "record_hash"] and set(pool[0]) == {"input_ids", "labels"}
    path = compute_gradients(tiny_lora_llama(vocab_size=len(tokenizer)), pool, output_dir=tmp_path / "s", dim=32)
    assert len(load_gradients(path)) == 5


def test_trainable_layer_unused_by_a_batch_gets_zero_gradient(tmp_path, tiny_lora_llama, token_rows):
    """A trainable layer outside the batch's computation (a projector on text-only rows) contributes zeros."""
    from torch import nn

    model = tiny_lora_llama(seed=2)
    model.unused_projector = nn.Linear(4, 3)  # trainable, never called by the forward pass
    pool = Dataset.from_list(token_rows(4, seed=9))
    path = compute_gradients(model, pool, output_dir=tmp_path / "s", projection="identity", dtype="float32")
    features = np.asarray(load_gradients(path)["features"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[-2:] == ["unused_projector.weight", "unused_projector.bias"]
    np.testing.assert_array_equal(features[:, -15:], 0.0)
    assert np.abs(features[:, :-15]).sum(axis=1).min() > 0
