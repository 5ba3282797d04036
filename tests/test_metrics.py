"""The evaluate metric modules shipped in the package: offline loading and hand-worked values."""

import glob
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from icons_hf.metrics import METRICS, load_metric, metric_path


@pytest.fixture(scope="module")
def vqa():
    return load_metric("vqa_accuracy", keep_in_memory=True)


@pytest.fixture(scope="module")
def exact():
    return load_metric("exact_match", keep_in_memory=True)


def module_of(metric):
    return sys.modules[type(metric).__module__]


def test_modules_are_package_data():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "icons_hf", "metrics", "*", "*.py"))
    )
    assert shipped == sorted(os.path.join("icons_hf", "metrics", m, f"{m}.py") for m in METRICS)
    with pytest.raises(ValueError, match="icons_hf ships: exact_match, vqa_accuracy"):
        metric_path("bleu")


def test_loads_offline_by_path(tmp_path):
    """A fresh interpreter with the Hub unreachable and offline mode on loads and runs both metrics."""
    script = textwrap.dedent(
        """
        import evaluate
        from icons_hf.metrics import load_metric, metric_path
        print(load_metric("vqa_accuracy").compute(predictions=["Two"], references=[["2", "2", "2"]])["vqa_accuracy"])
        print(evaluate.load(metric_path("exact_match")).compute(predictions=["a"], references=["a"])["exact_match"])
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1.0", "1.0"]


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes", "yes"),
        ("  The Two dogs.\n", "2 dogs"),
        ("an apple", "apple"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("5.", "5"),
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        ("don't", "dont"),
        ("None", "0"),
        ("ten", "10"),
        ("Mr. Smith's (left)", "mr smiths left"),
        ("a\tthe\tan", ""),
    ],
)
def test_vqa_normalisation(vqa, raw, normalised):
    assert module_of(vqa).normalize_answer(raw) == normalised


def test_vqa_accuracy_hand_worked(vqa):
    ten = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]  # three annotators said 2 (one as a word)
    # min(#matches / 3, 1): 3 matches -> 1; 7 -> 1; 1 ('four' vs one 4) -> 1/3; no match -> 0.
    assert vqa.compute(predictions=["2"], references=[ten])["vqa_accuracy"] == pytest.approx(1.0)
    assert vqa.compute(predictions=["Three."], references=[ten])["vqa_accuracy"] == pytest.approx(1.0)
    assert vqa.compute(predictions=["four"], references=[["4", "5", "6"]])["vqa_accuracy"] == pytest.approx(1 / 3)
    assert vqa.compute(predictions=["red"], references=[ten])["vqa_accuracy"] == 0.0
    # Two answers out of four: 2/3; averaged with a miss -> 1/3.
    got = vqa.compute(predictions=["blue", "cat"], references=[["blue", "Blue", "navy", "teal"], ["dog", "dog"]])
    assert got["vqa_accuracy"] == pytest.approx(1 / 3)
    # One reference per question (GQA-style): plain normalised match.
    got = vqa.compute(predictions=["The circle", "yes", "2"], references=["circle", "no", "two"])
    assert got["vqa_accuracy"] == pytest.approx(2 / 3)
    # Leave-one-out (VQA server): 3 matches of 10 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10.
    got = vqa.compute(predictions=["2"], references=[ten], leave_one_out=True)
    assert got["vqa_accuracy"] == pytest.approx(0.9)
    got = vqa.compute(predictions=["2"], references=[["2", "2", *["3"] * 8]], leave_one_out=True)
    assert got["vqa_accuracy"] == pytest.approx(0.6)


def test_vqa_accuracy_random_against_brute_force(vqa):
    rng = np.random.default_rng(2025)
    vocab = ["yes", "no", "red", "blue", "2", "3", "circle"]  # already normal forms
    predictions, references = [], []
    for _ in range(200):
        predictions.append(str(rng.choice(vocab)))
        references.append([str(a) for a in rng.choice(vocab[:4], size=int(rng.integers(2, 11)))])
    plain = np.mean([min(sum(r == p for r in refs) / 3, 1) for p, refs in zip(predictions, references, strict=True)])
    loo = np.mean([
        np.mean([min(sum(r == p for r in subset) / 3, 1) for subset in itertools.combinations(refs, len(refs) - 1)])
        for p, refs in zip(predictions, references, strict=True)
    ])
    got = vqa.compute(predictions=predictions, references=references)["vqa_accuracy"]
    assert got == pytest.approx(plain, abs=1e-12)
    got = vqa.compute(predictions=predictions, references=references, leave_one_out=True)["vqa_accuracy"]
    assert got == pytest.approx(loo, abs=1e-12)
    # Incremental batches give the same result as one call.
    for start in range(0, 200, 64):
        vqa.add_batch(predictions=predictions[start : start + 64], references=references[start : start + 64])
    assert vqa.compute()["vqa_accuracy"] == pytest.approx(plain, abs=1e-12)


def test_vqa_errors(vqa):
    with pytest.raises(ValueError, match="question 1 has no reference"):
        vqa.compute(predictions=["a", "b"], references=[["a"], []])


def test_exact_match(exact):
    preds, refs = ["Yes", " no", "U.S.A.", "New  York"], ["yes", "no", "USA", "new york"]
    assert exact.compute(predictions=preds, references=refs)["exact_match"] == pytest.approx(1 / 4)
    assert exact.compute(predictions=preds, references=refs, strip=False)["exact_match"] == 0.0
    assert exact.compute(predictions=preds, references=refs, ignore_case=True)["exact_match"] == pytest.approx(2 / 4)
    got = exact.compute(predictions=preds, references=refs, ignore_case=True, ignore_punctuation=True)
    assert got["exact_match"] == pytest.approx(3 / 4)
    got = exact.compute(predictions=preds, references=refs, ignore_case=True, ignore_punctuation=True,
                        normalize_whitespace=True)
    assert got["exact_match"] == 1.0
    # Several references: a match with any one counts.
    got = exact.compute(predictions=["cat", "dog", "cow"], references=[["dog", "cat"], ["dogs"], ["cow", "ox"]])
    assert got["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="example 0 has no reference"):
        exact.compute(predictions=["a"], references=[[]])
