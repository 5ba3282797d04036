"""examples/replica/decide_default.py applies benchmarks/results/decision_rule.md as written: tables whose answers
are worked out by hand in the comments, one where the choice seeds' pick stands and one where the held-out seeds
overturn it, and the composition table it writes beside the decision."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "replica")


@pytest.fixture(scope="module")
def decide():
    sys.path.insert(0, HERE)
    try:
        yield importlib.import_module("decide_default")
    finally:
        sys.path.remove(HERE)


def _write(folder, pools: dict, choice_seeds, kept=None) -> None:
    payload = {"family": "toy", "choice_seeds": choice_seeds, "pools": {
        name: {"relative_per_seed": {c: {str(s): v for s, v in enumerate(values)} for c, values in per.items()},
               "kept": (kept or {}).get(name, {})} for name, per in pools.items()}}
    (folder / "candidates_toy.json").write_text(json.dumps(payload))


def test_choice_stands_when_held_out_seeds_agree(decide, tmp_path):
    # Paired differences against random (100 everywhere), seeds 0-1 choice, 2-3 held out:
    # default: P1 +10 +12 +11 +13 (beats random), P2 +1 -1 +2 -2 (neither beats nor loses);
    # mix: P1 +5 +6 +4 +5 but below default by 5-8 points with std ~1.3 (loses to default), P2 +3 +4 +3 +4 (beats).
    # Nobody passes both pools; both never lose to random; worst cases: default 0 (P2), mix 3.5 (P2): mix.
    kept = {"mix": {"rows": 10.0, "harmful_share": 0.25, "rows_per_task": {"a": 6.0, "b": 4.0},
                    "generalist_rows": None, "generalist_share": None}}
    _write(tmp_path, {"P1": {"default": [110, 112, 111, 113], "mix": [105, 106, 104, 105], "random": [100] * 4},
                      "P2": {"default": [101, 99, 102, 98], "mix": [103, 104, 103, 104], "random": [100] * 4}},
           [0, 1], kept={"P1": kept})
    groups = decide.main(["--report_dir", str(tmp_path)])
    assert groups["choice"]["choice"] == {"default": "mix", "step": 3, "passing": [], "never_below_random": [
        "default", "mix"], "worst_case": pytest.approx({"default": 0.0, "mix": 3.5})}
    verdict = groups["all"]["verdict"]
    assert verdict["default"]["P1"]["passes"] and not verdict["default"]["P2"]["beats_random"]
    assert verdict["mix"]["P1"]["loses_to"] == ["default"] and verdict["mix"]["P2"]["passes"]
    assert groups["final"] == {"default": "mix", "overturned": False, "choice_seeds_pick": "mix"}
    text = (tmp_path / "decision.md").read_text()
    assert "## What each candidate keeps" in text and "| mix | – | 25% | a 6, b 4 |" in text


def test_held_out_seeds_overturn_a_pick_that_loses_to_random(decide, tmp_path):
    # mix on P2: +3 +4 on the choice seeds, -25 on the four held-out seeds: over all six seeds the mean is
    # -15.5 with std 14.7, a loss to random by more than one std, so step 3 over all seeds picks default.
    _write(tmp_path, {"P1": {"default": [110, 112, 111, 113, 110, 112], "mix": [105, 106, 104, 105, 104, 106],
                             "random": [100] * 6},
                      "P2": {"default": [101, 99, 102, 98, 101, 99], "mix": [103, 104, 75, 75, 75, 75],
                             "random": [100] * 6}}, [0, 1])
    groups = decide.main(["--report_dir", str(tmp_path)])
    assert groups["choice"]["choice"]["default"] == "mix"
    assert groups["all"]["verdict"]["mix"]["P2"]["loses_to_random"]
    assert groups["final"] == {"default": "default", "overturned": True, "choice_seeds_pick": "mix",
                               "loses_to_random_on": ["P2"]}
    assert "so step 3 over all seeds decides: **default**" in (tmp_path / "decision.md").read_text()
