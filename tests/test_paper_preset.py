"""select(preset="paper") is the released ICONS generalist; compute_influence(preset="paper") its specialist.

The reference below is the released rule written plainly (loops over rows and tasks): per task the threshold is
NumPy's linear percentile ``100 - P`` of its scores (``P`` the percent to keep), a task votes when its score is
``>=`` the threshold, and the ``int(P / 100 * N)`` rows with the most votes are kept (the released code's sort
leaves ties at the cut-off vote count in no defined order, so only rows strictly above / below it are compared).
"""

import json
import math

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_influence, select
from icons_hf.settings import SelectionSettings
from icons_hf.testing import write_store


def released_votes(columns, percent):
    """Vote counts and subset size of the released rule; ``columns`` one score array per task."""
    n = len(columns[0])
    k = int((percent / 100) * n)
    votes = [0] * n
    for column in columns:
        threshold = np.percentile(column, 100 - percent)
        for z in range(n):
            if column[z] >= threshold:
                votes[z] += 1
    return votes, k


def released_split(votes, k):
    """Rows strictly above and strictly below the cut-off vote count (the k-th largest)."""
    cut = sorted(votes, reverse=True)[k - 1]
    return {z for z, v in enumerate(votes) if v > cut}, {z for z, v in enumerate(votes) if v < cut}


def score_table(columns, index=None):
    n = len(columns[0])
    index = list(range(n)) if index is None else index
    return Dataset.from_dict({"index": index, **{f"influence_t{j}": col for j, col in enumerate(columns)}})


def check_against_released(table, columns, percent):
    votes, k = released_votes(columns, percent)
    out = select(table, fraction=percent / 100, preset="paper")
    where = f"N={len(votes)} tasks={len(columns)} percent={percent}"
    assert out["votes"] == votes, where
    selected = np.asarray(out["selected"])
    assert int(selected.sum()) == k, where
    above, below = released_split(votes, k)
    chosen = set(np.flatnonzero(selected).tolist())
    assert above <= chosen and not (below & chosen), where
    return out


@pytest.mark.parametrize("tasks", [3, 10])
@pytest.mark.parametrize("rows", [10, 37, 200, 1001, 20000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paper_preset_matches_released_rule_on_tie_heavy_tables(tasks, rows, dtype):
    rng = np.random.default_rng(rows * 31 + tasks)
    # Integers in a small range: many rows tie at every threshold and at the cut-off vote count.
    columns = [rng.integers(0, int(rng.integers(2, 7)), size=rows).astype(dtype) for _ in range(tasks)]
    table = score_table(columns)  # float32 columns as compute_influence writes them, or float64
    assert table.features["influence_t0"].dtype == np.dtype(dtype).name
    for percent in (5, 20, 60):
        if int(percent / 100 * rows) == 0:
            with pytest.raises(ValueError, match="selects no row"):
                select(table, fraction=percent / 100, preset="paper")
            continue
        check_against_released(table, columns, percent)


@pytest.mark.parametrize("percent", [7.5, 29, 33.3, 95])
def test_paper_preset_at_irregular_fractions(percent):
    rng = np.random.default_rng(int(percent * 10))
    for rows in (100, 101, 999):
        columns = [np.round(rng.normal(size=rows), 1) for _ in range(4)]  # ties from rounding, continuous otherwise
        out = check_against_released(score_table([c.tolist() for c in columns]), columns, percent)
        info = json.loads(out.info.description)["selection"]
        assert info["threshold_percentile"] == 100 - percent  # e.g. 71.0, not 100 * (1 - 0.29) = 71.00000000000001


def test_size_is_int_of_fraction_times_rows_as_python_computes_it():
    table = score_table([list(range(100)), list(range(100))[::-1]])
    assert 0.29 * 100 < 29  # 28.999999999999996
    assert sum(select(table, fraction=0.29, preset="paper")["selected"]) == int(0.29 * 100) == 28
    assert SelectionSettings.from_preset("paper", fraction=0.29).percentile() == 71.0
    # With num_rows, the threshold is tied to num_rows / N.
    settings = SelectionSettings.from_preset("paper", num_rows=25)
    assert settings.percentile(100) == 75.0 and settings.rows_to_keep(100) == 25


def test_paper_preset_worked_by_hand():
    # Ties at the threshold: tau = 60th percentile of [0, 0, 1, 1, 1] = 1 for both tasks. The released rule votes
    # on >=: task a for rows 0, 1, 2 and task b for rows 2, 3, 4, so votes = [1, 1, 2, 1, 1].
    a, b = [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]
    out = select(score_table([a, b]), fraction=0.4, preset="paper")
    assert out["votes"] == [1, 1, 2, 1, 1]
    # int(0.4 x 5) = 2 rows: row 2 (two votes), then the tie at one vote: mean percentile ranks of rows 0, 1, 3, 4
    # are all (0.75 + 0.125) / 2, so the lowest index, row 0.
    assert out["selected"] == [True, False, True, False, False]
    # The paper's formula (>) with the library's fixed 80th percentile gives no vote at all here.
    assert select(score_table([a, b]), fraction=0.4, task_floor=0.0)["votes"] == [0, 0, 0, 0, 0]
    # 20%: tau = 80th percentile; of [3, 3, 2, 1, 0, 0, 0, 0, 0, 0] that is 2.2, so task a votes for rows 0 and 1;
    # of [0, 0, 0, 0, 0, 0, 0, 1, 5, 5] it is 1 + 0.2 x 4 = 1.8: rows 8 and 9. int(0.2 x 10) = 2 rows among four
    # with one vote; mean percentile ranks: rows 0, 1 (8.5/9 + 3/9) / 2 = 0.639 (task b's seven zeros share rank
    # 3/9), rows 8, 9 (2.5/9 + 8.5/9) / 2 = 0.611 (task a's six zeros share 2.5/9): rows 0 and 1.
    a = [3, 3, 2, 1, 0, 0, 0, 0, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 0, 1, 5, 5]
    out = select(score_table([a, b]), fraction=0.2, preset="paper")
    assert out["votes"] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert out["selected"] == [True, True] + [False] * 8
    info = json.loads(out.info.description)["selection"]
    assert info["thresholds"] == {"t0": pytest.approx(2.2), "t1": pytest.approx(1.8)}
    np.testing.assert_allclose(out["tiebreak"][:2], [23 / 36] * 2, rtol=1e-6)
    assert info["threshold_inclusive"] is True and info["task_floor"] == 0.0
    assert info["settings"] == SelectionSettings.from_preset("paper", fraction=0.2).to_dict()


def test_paper_preset_keeps_explicit_arguments_and_refuses_both_settings_and_preset():
    table = score_table([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = select(table, fraction=0.5, preset="paper", threshold_inclusive=False)
    assert json.loads(out.info.description)["selection"]["threshold_inclusive"] is False
    with pytest.raises(ValueError, match="not both"):
        select(table, preset="paper", settings=SelectionSettings())
    with pytest.raises(ValueError, match="preset='nope'"):
        select(table, preset="nope")


# ---- the paper preset's specialist ----


def brute_force_mean(train, val, weights, *, normalise_val=True):
    """sum_c w_c mean_v (g_z / |g_z|) . (g_v / |g_v| or g_v), one pair at a time."""
    out = []
    for z in range(len(train[0])):
        total = 0.0
        for c, w in enumerate(weights):
            g = train[c][z] / np.linalg.norm(train[c][z])
            values = [float(g @ (v / np.linalg.norm(v) if normalise_val else v)) for v in val[c]]
            total += w * sum(values) / len(values)
        out.append(total)
    return np.asarray(out)


@pytest.mark.parametrize("checkpoints", [1, 2])
def test_paper_specialist_and_released_subtasks_match_loops(tmp_path, checkpoints):
    rng = np.random.default_rng(40 + checkpoints)
    lrs = [2e-4, 5e-5][:checkpoints]
    train = [rng.normal(size=(17, 5)) for _ in range(checkpoints)]
    # Subtask gradients of very different scales: normalising or not changes which subtask wins the max.
    val = {name: [rng.normal(size=(n, 5)) * scale for _ in range(checkpoints)]
           for name, n, scale in (("whole", 4, 1.0), ("s1", 3, 0.1), ("s2", 5, 10.0))}
    tpaths = [write_store(tmp_path / f"t{c}", train[c], learning_rate=lrs[c], weights=f"w{c}")
              for c in range(checkpoints)]
    vpaths = {k: [write_store(tmp_path / f"{k}{c}", v[c], weights=f"w{c}") for c in range(checkpoints)]
              for k, v in val.items()}
    tasks = {"whole": vpaths["whole"], "mme": {"s1": vpaths["s1"], "s2": vpaths["s2"]}}
    weights = [lr / sum(lrs) for lr in lrs]  # several checkpoints: the learning-rate-weighted sum, as LESS
    paper = compute_influence(tpaths, tasks, preset="paper")
    assert json.loads(paper.info.description)["influence"]["settings"]["specialist"] == "mean"
    np.testing.assert_allclose(
        paper["influence_whole"], brute_force_mean(train, val["whole"], weights), rtol=1e-5, atol=1e-6
    )
    expected = np.maximum(brute_force_mean(train, val["s1"], weights), brute_force_mean(train, val["s2"], weights))
    np.testing.assert_allclose(paper["influence_mme"], expected, rtol=1e-5, atol=1e-6)
    released = compute_influence(tpaths, tasks, specialist="mean_released")
    np.testing.assert_allclose(released["influence_whole"], paper["influence_whole"], rtol=1e-6)
    raw = np.maximum(brute_force_mean(train, val["s1"], weights, normalise_val=False),
                     brute_force_mean(train, val["s2"], weights, normalise_val=False))
    np.testing.assert_allclose(released["influence_mme"], raw, rtol=1e-5, atol=1e-6)
    assert not np.allclose(released["influence_mme"], paper["influence_mme"])
    assert math.isclose(sum(json.loads(paper.info.description)["influence"]["checkpoint_weights"]), 1.0)
