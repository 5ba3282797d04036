"""IconsCallback: the stores it writes during a Trainer run equal offline extraction from the saved checkpoint.
(Refusals before training: tests/test_hostile_features.py; sub-pools and run files: tests/test_checkpoints.py.)"""

import json
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import IconsCallback, compute_gradients, compute_influence, load_gradients, select


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
