"""End-to-end checks across stages: the CLI chain equals the Python API, the demo, text-only LLaVA pools, layers
a batch leaves unused."""

import json
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_gradients, compute_influence, load_gradients, select
from icons_hf.testing import write_store


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
