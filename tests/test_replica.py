"""The quality replica (examples/replica): pool construction, rule names, and a reduced run of the script's own
code path end to end (structure only; quality is what the full run measures)."""

import importlib
import json
import math
import os
import sys
from collections import Counter

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("matplotlib")

REPLICA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "replica")


@pytest.fixture(scope="module")
def replica():
    sys.path.insert(0, REPLICA)
    try:
        yield importlib.import_module("replica"), importlib.import_module("replica_harness")
    finally:
        sys.path.remove(REPLICA)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("icons", dict(base="icons", feature="adam", specialist="mean", floor=0.0)),
        ("icons-sgd-balanced-floor", dict(base="icons", feature="sgd", specialist="balanced", floor=1.0)),
        ("icons-sgd-zscore-floor50", dict(base="icons", feature="sgd", specialist="zscore", floor=0.5)),
        ("less-color", dict(base="less", task="color", feature="adam")),
        ("random", dict(base="random")),
    ],
)
def test_rule_names(replica, name, expected):
    _, harness = replica
    rule = harness.Rule.parse(name)
    assert {k: getattr(rule, k) for k in expected} == expected


@pytest.mark.parametrize("name,match", [("vote", "unknown base"), ("less", "name the task"), ("icons-fast", "modifier"),
                                        ("icons-floor0", "modifier"), ("icons-floor150", "modifier"),
                                        ("random-floor", "no modifiers")])
def test_rule_names_refused(replica, name, match):
    _, harness = replica
    with pytest.raises(ValueError, match=match):
        harness.Rule.parse(name)


def test_pool_rows_are_corrupted_as_specified(replica, tmp_path):
    _, harness = replica
    material = harness.Material()
    split = harness.seed_split(material, 0, stage1_images=1000, validation_per_task=6, test_per_task=30)
    for task in ("shape", "color", "yesno"):
        val_ids = {r["id"] for r in split.validation[task]}
        assert len(val_ids) == 6 and not val_ids & {r["id"] for r in split.test[task]}
        answers = Counter(r["conversations"][1]["value"] for r in split.test[task])
        assert max(answers.values()) <= math.ceil(30 / len(harness.ANSWERS[task]))
    spec = harness.POOLS["B"]
    records, kinds = harness.build_pool(material, split, spec, size=200, seed=0, image_dir=str(tmp_path / "img"))
    assert Counter(kinds) == Counter({k: n for k, n in spec.counts(200).items() if n})
    originals = {}
    for r in material.train_records:
        originals.setdefault((r["conversations"][0]["value"], r["image"]), []).append(r["conversations"][1]["value"])
    stage1 = set(split.stage1_images)
    for record, kind in zip(records, kinds, strict=True):
        question, answer = (t["value"] for t in record["conversations"])
        image = record["image"]
        assert os.path.isfile(image)
        task = harness.answer_task(answer)
        if kind == "unreadable":
            assert image.startswith(str(tmp_path))
        else:
            assert os.path.basename(image) not in stage1
        if kind == "off_task":
            assert any(q == question and answer in a for (q, _), a in originals.items())
        elif kind in ("clean", "wrong_same", "wrong_other"):
            truth = originals[(question, os.path.basename(image))]
            assert (answer in truth) == (kind == "clean")
            if kind != "clean":
                same_type = harness.answer_task(truth[0]) == task
                assert same_type == (kind == "wrong_same")


def test_reduced_run_end_to_end(replica, tmp_path):
    script, harness = replica
    out, reports = tmp_path / "runs", tmp_path / "report"
    argv = [
        "--output_dir", str(out), "--report_dir", str(reports), "--seeds", "0", "--pools", "A", "B",
        "--pool_size", "120", "--fractions", "0.1", "0.25",
        "--sweep_rules", "icons", "random", "icons-sgd-balanced-floor",
        "--compare_rules", "icons-floor", "icons-balanced", "less-shape", "icons-sgd",
        "--other_pool_rules", "icons-floor",
        "--validation_per_task", "6", "--test_per_task", "24", "--vision_steps", "3", "--stage1_steps", "3",
        "--stage1_questions", "20", "--warmup_epochs", "1", "--warmup_fraction", "0.1", "--warmup_batch_size", "4",
        "--checkpoints", "1",
        "--dim", "64", "--diagnostic_rows", "6", "--train_steps", "3", "--workers", "1",
    ]
    results = script.main(argv)

    plan = script.plan_runs(script.make_parser().parse_args_into_dataclasses(args=argv)[0])
    assert len(results["runs"]) == sum(len(v) for v in plan.values())
    assert {r["rule"] for r in results["runs"] if r["pool"] == "B"} == {"full", "icons", "icons-floor", "random",
                                                                         "icons-sgd-balanced-floor"}
    # The library's default rule selects what the library's defaults select.
    from icons_hf import compute_influence, load_run, select

    train, tasks = load_run(str(out / "seed0" / "poolA" / "features-sgd"))
    default = select(compute_influence(train, tasks), fraction=0.25)
    selections = json.loads((out / "seed0" / "poolA" / "selections.json").read_text())
    chosen = sorted(default.filter(lambda r: r["selected"])["index"])
    assert chosen == selections["icons-sgd-balanced-floor@0.25"]["rows"]
    for run in results["runs"]:
        assert set(run["accuracy"]) == {"shape", "color", "yesno"}
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
        expected_rows = 120 if run["rule"] == "full" else math.floor(run["fraction"] * 120)
        assert run["rows"] == expected_rows
    for pool in ("A", "B"):
        selections = json.loads((out / "seed0" / f"pool{pool}" / "selections.json").read_text())
        for sel in selections.values():
            rows = sel["rows"]
            assert len(rows) == len(set(rows)) == sel["composition"]["rows"]
            assert sum(sel["composition"]["kind"].values()) == len(rows)
        full = results["summary"][pool]["full@1"]
        assert full["relative"][0] == pytest.approx(1.0) or math.isnan(full["relative"][0])
    # Row kinds are written next to the pool for the report, never into what the rules read.
    pool_file = json.loads((out / "seed0" / "poolA" / "pool.json").read_text())
    assert len(pool_file["kinds"]) == len(pool_file["records"]) == 120
    assert all(set(r) == {"id", "image", "conversations"} for r in pool_file["records"])
    # Diagnostics: the momentum share is a share.
    feats = results["features"]
    assert 0.0 <= feats["momentum_share"][0] <= 1.5 and feats["measurements"] == 2
    targets = results["targets"]["A"]
    assert set(targets) == {
        "icons", "icons-floor", "icons-balanced", "less-shape", "icons-sgd", "icons-sgd-balanced-floor",
    }
    assert targets["icons-sgd-balanced-floor"]["is_default"] and targets["icons"]["is_paper"]
    # The report: one JSON, one page, two figures.
    for name in ("replica.json", "replica.md", "replica.png", "replica_composition.png"):
        assert (reports / name).stat().st_size > 0
    page = (reports / "replica.md").read_text()
    assert "python examples/replica/replica.py" in page
    assert "## Targets at 25%" not in page and "## Targets at 20%" in page
    assert json.loads((reports / "replica.json").read_text())["summary"]["A"]["icons@0.1"]["seeds"] == 1

    # A rerun resumes from the finished jobs (same numbers); other arguments are refused.
    again = script.main(argv)
    assert again["summary"] == results["summary"]
    changed = list(argv)
    changed[changed.index("--train_steps") + 1] = "4"
    with pytest.raises(ValueError, match="train_steps"):
        script.main(changed)
    # A setting recorded by an older version (rule names meant other floors then) is a difference too.
    saved = json.loads((out / "replica_args.json").read_text())
    (out / "replica_args.json").write_text(json.dumps({**saved, "task_floor": 0.5}))
    with pytest.raises(ValueError, match="task_floor"):
        script.main(argv)


@pytest.mark.multiprocess
def test_reduced_run_under_accelerate_launch_with_two_processes(tmp_path):
    """Two CPU processes: warmups run data-parallel with the callback's rows split, training runs shared out."""
    import subprocess

    out, reports = tmp_path / "runs", tmp_path / "report"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(REPLICA, "replica.py"),
        "--output_dir", str(out), "--report_dir", str(reports), "--seeds", "0", "--pools", "A", "--pool_size", "80",
        "--fractions", "0.25", "--sweep_rules", "icons", "random", "--compare_rules", "icons-floor",
        "--validation_per_task", "4", "--test_per_task", "12", "--vision_steps", "2", "--stage1_steps", "2",
        "--stage1_questions", "10", "--warmup_epochs", "1", "--warmup_fraction", "0.1", "--warmup_batch_size", "2",
        "--checkpoints", "1", "--dim", "32", "--diagnostic_rows", "4", "--train_steps", "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((reports / "replica.json").read_text())
    assert results["timing"]["mode"] == "accelerate launch, 2 processes"
    assert {(r["rule"], r["fraction"]) for r in results["runs"]} == {
        ("full", 1.0), ("icons", 0.25), ("random", 0.25), ("icons", 0.2), ("random", 0.2), ("icons-floor", 0.2),
        ("icons-sgd-balanced-floor", 0.2)}
    # One store per checkpoint and feature kind, complete, with every pool row.
    for kind in ("adam", "sgd"):
        run = json.loads((out / "seed0" / "poolA" / f"features-{kind}" / "icons_run.json").read_text())
        checkpoint = out / "seed0" / "poolA" / f"features-{kind}" / run["checkpoints"][0]["checkpoint"]
        train = json.loads((checkpoint / "train" / "store.json").read_text())
        assert train["num_features"] == 80


@pytest.mark.parametrize("name,expected", [
    ("gain-sgd-balanced", dict(base="gain", feature="sgd", specialist="balanced", floor=None)),
    ("veto-sgd-balanced", dict(base="veto", floor=None)),
    ("rank-sgd-balanced", dict(base="rank", floor=None)),
    ("mix-sgd-balanced", dict(base="mix", floor=None)),
    ("blend-sgd-balanced", dict(base="blend", floor=0.5)),
])
def test_candidate_rule_names(replica, name, expected):
    _, harness = replica
    rule = harness.Rule.parse(name)
    assert {k: getattr(rule, k) for k in expected} == expected


def test_clean_pool_is_pool_a_uncorrupted(replica, tmp_path):
    _, harness = replica
    material = harness.Material()
    split = harness.seed_split(material, 1, stage1_images=1000, validation_per_task=6, test_per_task=30)
    noisy, noisy_kinds = harness.build_pool(material, split, harness.POOLS["A"], size=300, seed=1,
                                            image_dir=str(tmp_path / "a"))
    clean, clean_kinds = harness.build_pool(material, split, harness.POOLS["A-clean"], size=300, seed=1,
                                            image_dir=str(tmp_path / "c"))
    assert set(clean_kinds) == {"clean"} and Counter(noisy_kinds)["clean"] < 250
    originals = {}
    for r in material.train_records:
        originals.setdefault((r["conversations"][0]["value"], r["image"]), set()).add(r["conversations"][1]["value"])
    for a, c in zip(noisy, clean, strict=True):
        question, answer = (t["value"] for t in c["conversations"])
        assert question == a["conversations"][0]["value"]  # the same draw of questions as pool A: its task mix
        assert answer in originals[(question, os.path.basename(c["image"]))]  # every row as easy-VQA has it


def test_candidates_run_end_to_end(replica, tmp_path):
    script, _ = replica
    out, reports = tmp_path / "runs", tmp_path / "report"
    argv = [
        "--output_dir", str(out), "--report_dir", str(reports), "--seeds", "0", "--pools", "A-clean", "B",
        "--candidates", "--report_name", "replica_candidates", "--pool_size", "100",
        "--validation_per_task", "6", "--test_per_task", "24", "--vision_steps", "2", "--stage1_steps", "2",
        "--stage1_questions", "20", "--warmup_epochs", "1", "--warmup_fraction", "0.1", "--warmup_batch_size", "4",
        "--checkpoints", "1", "--dim", "64", "--diagnostic_rows", "6", "--train_steps", "2", "--workers", "1",
    ]
    script.main(argv)
    summary = json.loads((reports / "candidates_easyvqa.json").read_text())
    assert (reports / "candidates_easyvqa.md").stat().st_size > 0
    assert set(summary["pools"]) == {"A-clean", "B"}
    for pool, entry in summary["pools"].items():
        assert set(entry["relative_per_seed"]) == set(script.CANDIDATE_RULES)
        assert entry["relative_per_seed"]["full"] == {"0": pytest.approx(100.0)} or pool == "B"
        choice = entry["groups"]["choice"]
        for name in ("default", "gain", "blend"):
            paired = entry["relative_per_seed"][name]["0"] - entry["relative_per_seed"]["random"]["0"]
            assert choice[name]["difference_vs_random"][0] == pytest.approx(paired)
        assert entry["kept"]["gain"]["rows"] == 20 and entry["kept"]["full"]["rows"] == 100
        assert sum(entry["kept"]["blend"]["rows_per_task"].values()) == 20
    assert all(k["harmful_share"] == 0 for k in summary["pools"]["A-clean"]["kept"].values())
    assert summary["pools"]["B"]["kept"]["full"]["harmful_share"] == pytest.approx(0.45)
    assert summary["candidate_names"]["paper"] == "icons" and summary["cost"]["cpu_min"] > 0
