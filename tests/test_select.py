"""select: every consensus rule and the per-task floors worked by hand, ties included. (Brute force on tied
tables: tests/test_scale.py; the paper preset: tests/test_paper_preset.py.)"""

import json
import logging
import math

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import select


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
