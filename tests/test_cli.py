"""The command line: options generated from the settings dataclasses, presets passed through, and user errors
as one `icons-hf <command>: error: ...` line with exit status 2 (never a traceback)."""

import argparse
import dataclasses
import json
import os
import re

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import select
from icons_hf.cli import main, make_parser, stage_kwargs
from icons_hf.pools import record_hash
from icons_hf.settings import FeatureSettings, InfluenceSettings, SelectionSettings

STAGES = [
    ("gradients", FeatureSettings, ("train_feature",)),
    ("influence", InfluenceSettings, ()),
    ("select", SelectionSettings, ()),
]
REQUIRED = {
    "gradients": ["--model", "m", "--dataset", "d", "--output-dir", "o"],
    "influence": ["--output", "o"],
    "select": ["scores", "--output", "o"],
}


def _subparsers():
    parser = make_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["demo", "gradients", "influence", "select", "export", "report", "push"])
def test_every_option_has_help(command):
    sub = _subparsers()[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{command} {action.option_strings or action.dest}"
    sub.format_help()  # help texts format (no stray %)


@pytest.mark.parametrize("command, cls, skip", STAGES)
def test_settings_fields_are_options_with_todays_spellings(command, cls, skip):
    sub = _subparsers()[command]
    options = {o for a in sub._actions for o in a.option_strings}
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            assert f"--{f.name.replace('_', '-')}" in options
    assert "--preset" in options
    # Nothing given: nothing passed on (the library applies the preset and its defaults).
    assert stage_kwargs(make_parser().parse_args([command, *REQUIRED[command]]), cls, skip=skip) == {}


@pytest.mark.parametrize(
    "command, cls, extra, expected",
    [
        (
            "select",
            SelectionSettings,
            ["--preset", "paper", "--fraction", "0.05"],
            {"preset": "paper", "fraction": 0.05},
        ),
        (
            "select",
            SelectionSettings,
            ["--threshold-percentile", "90", "--method", "task", "--task", "vqa", "--no-threshold-inclusive"],
            {"threshold_percentile": 90.0, "method": "task", "task": "vqa", "threshold_inclusive": False},
        ),
        ("select", SelectionSettings, ["--num-rows", "7", "--task-floor", "0"], {"num_rows": 7, "task_floor": 0.0}),
        (
            "influence",
            InfluenceSettings,
            ["--preset", "paper", "--checkpoint-weights", "1", "2", "--batch-size", "64"],
            {"preset": "paper", "checkpoint_weights": [1.0, 2.0], "batch_size": 64},
        ),
        (
            "gradients",
            FeatureSettings,
            [
                "--preset",
                "default",
                "--batch-size",
                "2",
                "--max-length",
                "512",
                "--projection",
                "rademacher",
                "--dim",
                "5120",
            ],
            {"preset": "default", "batch_size": 2, "max_length": 512, "projection": "rademacher", "dim": 5120},
        ),
    ],
)
def test_given_options_and_preset_are_passed_on(command, cls, extra, expected):
    args = make_parser().parse_args([command, *REQUIRED[command], *extra])
    skip = ("train_feature",) if cls is FeatureSettings else ()
    assert stage_kwargs(args, cls, skip=skip) == expected


def test_select_and_influence_pass_the_preset_to_the_library(tmp_path, monkeypatch):
    import icons_hf.consensus
    import icons_hf.influence

    calls = {}

    def fake(name):
        def record(*args, **kwargs):
            calls[name] = kwargs
            raise ValueError(f"{name} reached")

        return record

    monkeypatch.setattr(icons_hf.consensus, "select", fake("select"))
    monkeypatch.setattr(icons_hf.influence, "compute_influence", fake("influence"))
    table = tmp_path / "scores"
    Dataset.from_dict({"index": [0, 1], "influence_a": [0.1, 0.2]}).save_to_disk(str(table))
    assert main(["select", str(table), "--preset", "paper", "--fraction", "0.5", "--output", str(tmp_path / "o")]) == 2
    assert calls["select"] == {"preset": "paper", "fraction": 0.5}
    assert (
        main(
            [
                "influence",
                "--train",
                str(tmp_path / "t"),
                "--task",
                f"a={tmp_path / 'v'}",
                "--preset",
                "paper",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert calls["influence"]["preset"] == "paper" and "specialist" not in calls["influence"]


# ---- user errors: one line, exit status 2 ----


def _records(n=10):
    return [
        {"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(n)
    ]


@pytest.fixture()
def selected(tmp_path):
    records = _records()
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(records))
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(records[::-1]))
    rng = np.random.default_rng(0)
    table = Dataset.from_dict(
        {
            "index": list(range(10)),
            "influence_a": rng.normal(size=10).tolist(),
            "influence_b": rng.normal(size=10).tolist(),
            "record_hash": [record_hash(r) for r in records],
        }
    )
    table.save_to_disk(str(tmp_path / "scores"))
    select(table, fraction=0.3).save_to_disk(str(tmp_path / "selected"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("# my own card")
    return tmp_path


CASES = [
    (
        "influence_without_inputs",
        ["influence", "--output", "{t}/o"],
        r"no gradient stores given: pass --run DIR .* or --train STORE\.\.\. .* --task NAME=STORE",
    ),
    (
        "influence_train_without_task",
        ["influence", "--train", "{t}/x", "--output", "{t}/o"],
        r"no gradient stores given",
    ),
    (
        "influence_run_and_train",
        ["influence", "--run", "{t}/r", "--train", "{t}/x", "--output", "{t}/o"],
        r"either --run DIR or --train",
    ),
    (
        "influence_bad_task_spec",
        ["influence", "--train", "{t}/x", "--task", "vqa", "--output", "{t}/o"],
        r"--task 'vqa': expected NAME=STORE",
    ),
    (
        "influence_task_twice",
        ["influence", "--train", "{t}/x", "--task", "a={t}/v", "--task", "a={t}/w", "--output", "{t}/o"],
        r"task 'a' was given twice",
    ),
    (
        "influence_output_is_a_store",
        ["influence", "--train", "{t}/scores", "--task", "a={t}/v", "--output", "{t}/scores"],
        r"--output .*/scores is the input .*/scores",
    ),
    (
        "select_over_its_input",
        ["select", "{t}/scores", "--output", "{t}/scores"],
        r"--output .*/scores is the input .*/scores; writing there would destroy what is being read\. "
        r"Pass a new folder",
    ),
    ("select_inside_its_input", ["select", "{t}/scores", "--output", "{t}/scores/selected"], r"is inside the input"),
    (
        "select_no_folder",
        ["select", "{t}/nothing", "--output", "{t}/o"],
        r"the scores folder .*/nothing is not a folder",
    ),
    (
        "select_not_a_table",
        ["select", "{t}/empty", "--output", "{t}/o"],
        r"the scores folder .*/empty is not a score table saved by 'icons-hf influence'",
    ),
    (
        "select_fraction_and_num_rows",
        ["select", "{t}/scores", "--fraction", "0.1", "--num-rows", "3", "--output", "{t}/o"],
        r"pass either --fraction or --num-rows",
    ),
    ("select_bad_fraction", ["select", "{t}/scores", "--fraction", "1.5", "--output", "{t}/o"], r"fraction"),
    (
        "export_shuffled_pool",
        ["export", "--pool", "{t}/shuffled.json", "--scores", "{t}/selected", "--output-dir", "{t}/out"],
        r"pool 'shuffled' is not the pool the scores were computed on: row 0",
    ),
    (
        "export_shorter_pool",
        ["export", "--pool", "{t}/short.json", "--scores", "{t}/selected", "--output-dir", "{t}/out"],
        r"pool 'short' has 4 rows",
    ),
    (
        "export_over_scores",
        ["export", "--pool", "{t}/pool.json", "--scores", "{t}/selected", "--output-dir", "{t}/selected"],
        r"--output-dir .*/selected is the input",
    ),
    (
        "export_over_own_readme",
        ["export", "--pool", "{t}/pool.json", "--scores", "{t}/selected", "--output-dir", "{t}/mine"],
        r"already holds README.md, which no icons_hf export wrote",
    ),
    (
        "export_pool_missing",
        ["export", "--pool", "{t}/nope.json", "--scores", "{t}/selected", "--output-dir", "{t}/out"],
        r"pool file .*/nope.json does not exist",
    ),
    (
        "export_pool_not_records",
        ["export", "--pool", "{t}/notes.txt", "--scores", "{t}/selected", "--output-dir", "{t}/out"],
        r"expected a .json/.jsonl records file",
    ),
    (
        "export_scores_not_selected",
        ["export", "--pool", "{t}/pool.json", "--scores", "{t}/scores", "--output-dir", "{t}/out"],
        r"--scores .*/scores holds influence scores without a selection; run 'icons-hf select .*/scores --output "
        r"SELECTED' first and pass --scores SELECTED$",
    ),
    (
        "report_not_an_export",
        ["report", "{t}/empty"],
        r"selection.json does not exist: .* is not a complete ICONS export",
    ),
    ("push_not_an_export", ["push", "{t}/empty", "me/repo"], r"is not a complete ICONS export"),
    (
        "gradients_adam_without_state",
        ["gradients", "--model", "m", "--dataset", "{t}/d", "--output-dir", "{t}/o", "--feature", "adam"],
        r"--feature adam needs the checkpoint's optimizer state",
    ),
    (
        "gradients_store_inside_the_dataset",
        ["gradients", "--model", "m", "--dataset", "{t}/scores", "--output-dir", "{t}/scores/stores"],
        r"--output-dir .*/scores/stores is inside the input .*/scores",
    ),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_and_exit_2(selected, capsys, argv, message):
    (selected / "short.json").write_text(json.dumps(_records(4)))
    (selected / "notes.txt").write_text("not a pool")
    before = sorted(os.listdir(selected / "scores"))
    argv = [a.replace("{t}", str(selected)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"icons-hf {argv[0]}: error: "), err
    assert re.search(message, err[0]), err[0]
    assert sorted(os.listdir(selected / "scores")) == before  # inputs untouched
    assert (selected / "mine" / "README.md").read_text() == "# my own card"


def test_cli_export_of_the_scored_pool_verifies_row_identity(selected, capsys):
    assert (
        main(
            [
                "export",
                "--pool",
                str(selected / "pool.json"),
                "--scores",
                str(selected / "selected"),
                "--output-dir",
                str(selected / "out"),
            ]
        )
        == 0
    )
    meta = json.load(open(selected / "out" / "selection.json"))
    assert meta["row_identity"].startswith("verified") and meta["num_selected"] == 3
