"""Failures that used to come late fail before the warmup's first step: a validation set (or the pool) that
on_bad_row='skip' would empty, and a Trainer data collator that cannot batch the rows for the model. A launch
that asked for several processes but started one is logged."""

import logging
import os

import pytest
import torch
from datasets import Dataset

from icons_hf import IconsCallback
from icons_hf.distributed import init_distributed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unsupervised(rows):
    return Dataset.from_list([{**r, "labels": [-100] * len(r["labels"])} for r in rows])


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("task", r"tasks\['t'\]: every one of its 3 rows would be skipped under on_bad_row='skip' \(row 0: no "
                 r"supervised tokens.*no validation example"),
        ("subtask", r"tasks\['t'\]\['b'\]: every one of its 3 rows would be skipped"),
        ("pool", r"pool: every one of its 3 rows would be skipped.*no row to select from"),
        ("sub-pools", r"pool\['a'\]: every one of its 3 rows would be skipped.*no row to select from"),
    ],
)
def test_a_dataset_that_skip_would_empty_is_refused_when_the_callback_is_built(token_rows, where, message):
    good, empty = Dataset.from_list(token_rows(3, seed=1)), _unsupervised(token_rows(3, seed=2))
    pool = {"pool": empty, "sub-pools": {"a": empty, "b": empty}}.get(where, good)
    tasks = {"t": {"a": good, "b": empty}} if where == "subtask" else {"t": empty if where == "task" else good}
    with pytest.raises(ValueError, match=message):
        IconsCallback(pool, tasks, on_bad_row="skip", dim=8)
    # One good row left is enough: the others are recorded skips, as before.
    rows = token_rows(3, seed=2)
    partly = Dataset.from_list([r if i == 0 else {**r, "labels": [-100] * len(r["labels"])}
                                for i, r in enumerate(rows)])
    callback = IconsCallback(good, {"t": partly}, on_bad_row="skip", dim=8)
    assert callback.settings.on_bad_row == "skip"
    # A sub-pool that loses every row is allowed while another part keeps rows.
    assert IconsCallback({"a": empty, "b": good}, {"t": good}, on_bad_row="skip", dim=8).pool["b"] is good


def test_a_row_too_long_for_every_row_is_refused_before_the_first_step(tmp_path, tiny_lora_llama, token_rows):
    from transformers import Trainer, TrainingArguments

    from icons_hf.data import IconsCollator

    long_task = Dataset.from_list([{"input_ids": [1] * 70, "labels": [1] * 70}] * 2)
    callback = IconsCallback(Dataset.from_list(token_rows(4)), {"t": long_task}, str(tmp_path / "icons"),
                             on_bad_row="skip", dim=8)  # the model's limit is known only at on_train_begin
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1,
                             save_steps=1, report_to="none", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = Trainer(model=tiny_lora_llama(seed=0), args=args, train_dataset=Dataset.from_list(token_rows(4)),
                      data_collator=IconsCollator(0), callbacks=[callback])
    with pytest.raises(ValueError, match=r"tasks\['t'\]: every one of its 2 rows would be skipped .*70 tokens"):
        trainer.train()
    assert trainer.state.global_step == 0 and not os.path.exists(tmp_path / "icons")


def _drop_labels(features):
    return {"input_ids": torch.tensor([f["input_ids"][:4] for f in features])}


def _ragged_labels(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "labels": ids[:, :-1]}


def _float_ids(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids.float(), "labels": ids}


@pytest.mark.parametrize(
    ("collator", "message"),
    [
        (None, r"data collator \(function\) cannot batch the training rows for the model: ValueError"),
        (_drop_labels, r"\(function\) .*: it returned no 'labels'"),
        (_ragged_labels, r"its labels have shape \(2, \d+\) but input_ids \(2, \d+\)"),
        (_float_ids, r"cannot batch the training rows for the model: RuntimeError"),
    ],
)
def test_a_collator_the_model_cannot_take_is_refused_naming_icons_collator(tmp_path, tiny_lora_llama, token_rows,
                                                                           collator, message):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    steps = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    callback = IconsCallback(Dataset.from_list(token_rows(4)), {"t": Dataset.from_list(token_rows(2, seed=3))},
                             str(tmp_path / "icons"), dim=8)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1,
                             save_steps=1, report_to="none", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = Trainer(model=tiny_lora_llama(seed=0), args=args, train_dataset=Dataset.from_list(token_rows(4, seed=5)),
                      data_collator=collator, callbacks=[callback, Steps()])
    with pytest.raises(ValueError, match=message) as caught:
        trainer.train()
    assert "IconsCollator(pad_token_id=" in str(caught.value) and "before the first step" in str(caught.value)
    assert steps == [] and not os.path.exists(tmp_path / "icons")


def test_the_preflight_forward_leaves_training_mode_and_random_state_alone(tmp_path, tiny_lora_llama, token_rows):
    from icons_hf.callback import check_collator
    from icons_hf.data import IconsCollator

    model = tiny_lora_llama(seed=0)
    model.train()
    loader = torch.utils.data.DataLoader(Dataset.from_list(token_rows(4)), batch_size=2,
                                         collate_fn=IconsCollator(0))
    before = torch.get_rng_state()
    check_collator(loader, model)
    assert model.training and torch.equal(torch.get_rng_state(), before)


def test_a_launch_that_lost_its_processes_is_logged(monkeypatch, caplog):
    import icons_hf.distributed as distributed

    monkeypatch.setattr(distributed, "_warned_single", False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level(logging.WARNING, logger="icons_hf.distributed"):
        monkeypatch.delenv("MASTER_PORT", raising=False)
        init_distributed()  # --num_processes 1: nothing to say
        assert not caplog.records
        monkeypatch.setenv("MASTER_PORT", "29500")  # what accelerate's one-process launcher sets for several
        init_distributed()
        init_distributed()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "this run has one" in warnings[0] and "torchrun --nproc_per_node 2" in warnings[0]
