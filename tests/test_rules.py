"""The consensus rules 'gain', 'veto' and 'mix' against brute-force loops written from their docstrings, on fresh random
tables with and without ties, and a rule's own default task_floor."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import select
from icons_hf.provenance import provenance
from icons_hf.rules import RULE_FLOORS
from icons_hf.settings import SelectionSettings


def _table(mat: np.ndarray) -> Dataset:
    columns = {"index": np.arange(len(mat))}
    columns.update({f"influence_t{j}": mat[:, j].astype(np.float32) for j in range(mat.shape[1])})
    return Dataset.from_dict(columns)


def _pct_ranks(column: np.ndarray) -> np.ndarray:
    """Average-rank percentile ranks by a plain loop: (r - 1) / (N - 1), r the mean 1-based rank of equal values."""
    n = len(column)
    out = np.zeros(n)
    for i in range(n):
        below = sum(1 for v in column if v < column[i])
        equal = sum(1 for v in column if v == column[i])
        out[i] = (below + (equal - 1) / 2) / (n - 1)
    return out


def _random_table(seed: int, n: int, k: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mat = rng.random((n, k)).astype(np.float32)
    if ties:
        mat = np.round(mat * 7).astype(np.float32) / 7
    return mat.astype(np.float64)


def _gain_reference(mat: np.ndarray, n_keep: int, percentile: float = 80.0) -> set[int]:
    n, k = mat.shape
    q = np.stack([_pct_ranks(mat[:, j]) for j in range(k)], axis=1)
    total = q.sum(axis=1)
    per_task = n_keep // k
    chosen: list[int] = []
    orders = []
    for j in range(k):
        above = [i for i in range(n) if q[i, j] > percentile / 100]
        rest = [i for i in range(n) if q[i, j] <= percentile / 100]
        above.sort(key=lambda i: (-round(total[i], 9), i))
        rest.sort(key=lambda i, j=j: (-q[i, j], i))
        orders.append(above + rest)
    for _ in range(per_task):
        for j in range(k):
            chosen.append(next(i for i in orders[j] if i not in chosen))
    left = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-round(total[i], 9), i))
    return set(chosen) | set(left[: n_keep - len(chosen)])


def _veto_reference(mat: np.ndarray, n_keep: int, percentile: float = 80.0) -> set[int]:
    n, k = mat.shape
    q = np.stack([_pct_ranks(mat[:, j]) for j in range(k)], axis=1)
    tau = [np.percentile(mat[:, j].astype(np.float32), percentile) for j in range(k)]
    votes = [sum(1 for j in range(k) if np.float32(mat[i, j]) > tau[j]) for i in range(n)]
    key = [(-1 if min(q[i]) < 0.05 else votes[i], round(q[i].mean(), 9)) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-key[i][0], -key[i][1], i))
    return set(order[:n_keep])


@pytest.mark.parametrize("seed,n,k,ties", [(0, 60, 3, False), (1, 97, 4, True), (2, 200, 5, True),
                                           (3, 150, 2, False)])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37])
def test_gain_matches_brute_force(seed, n, k, ties, fraction):
    mat = _random_table(seed, n, k, ties)
    out = select(_table(mat), fraction=fraction, method="gain")
    got = set(np.flatnonzero(np.asarray(out["selected"])).tolist())
    assert got == _gain_reference(mat, int(fraction * n))
    assert provenance(out)["selection"]["floor_rows_per_task"] == int(fraction * n) // k


@pytest.mark.parametrize("seed,n,k,ties", [(4, 60, 3, False), (5, 97, 4, True), (6, 200, 6, True)])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_veto_matches_brute_force(seed, n, k, ties, fraction):
    mat = _random_table(seed, n, k, ties)
    out = select(_table(mat), fraction=fraction, method="veto")
    got = set(np.flatnonzero(np.asarray(out["selected"])).tolist())
    assert got == _veto_reference(mat, int(fraction * n))
    q = np.stack([_pct_ranks(mat[:, j]) for j in range(k)], axis=1)
    assert provenance(out)["selection"]["vetoed_rows"] == int((q.min(axis=1) < 0.05).sum())


def test_gain_prefers_rows_several_tasks_rank_high():
    # Row 0 is in the top part of every task but the best of none; each task's own best row (1, 2, 3) is at the
    # bottom of the others. With one floor row per task, gain takes row 0 first for task 0; vote takes row 1.
    rng = np.random.default_rng(7)
    mat = rng.random((40, 3)) * 0.5
    mat[0] = [0.9, 0.9, 0.9]
    for j in range(3):
        mat[1 + j] = 0.0
        mat[1 + j, j] = 1.0
    gain = set(np.flatnonzero(np.asarray(select(_table(mat), num_rows=3, method="gain")["selected"])).tolist())
    vote = set(np.flatnonzero(np.asarray(select(_table(mat), num_rows=3)["selected"])).tolist())
    assert 0 in gain and vote == {1, 2, 3}


def test_rules_carry_their_default_floor():
    assert RULE_FLOORS["vote"] == 1.0 and RULE_FLOORS["gain"] == 1.0 and RULE_FLOORS["veto"] == 0.0
    assert SelectionSettings(method="gain").floor_share() == 1.0
    assert SelectionSettings(method="veto").floor_share() == 0.0
    assert SelectionSettings(method="gain", task_floor=0.25).floor_share() == 0.25


def _mix_reference(mat: np.ndarray, n_keep: int) -> tuple[set[int], list[int]]:
    """'mix' from its docstring: home task by the highest score (first on ties), floors split by the
    home-row counts with largest remainders, tasks taking turns; the rest by mean percentile rank, then index."""
    n, k = mat.shape
    q = np.stack([_pct_ranks(mat[:, j]) for j in range(k)], axis=1)
    counts = [0] * k
    for i in range(n):
        counts[max(range(k), key=lambda j, i=i: (mat[i, j], -j))] += 1
    exact = [n_keep * c / n for c in counts]
    quotas = [int(np.floor(e)) for e in exact]
    for j in sorted(range(k), key=lambda j: (-(exact[j] - quotas[j]), j))[: n_keep - sum(quotas)]:
        quotas[j] += 1
    orders = [sorted(range(n), key=lambda i, j=j: (-mat[i, j], i)) for j in range(k)]
    chosen: list[int] = []
    for turn in range(max(quotas)):
        for j in range(k):
            if turn < quotas[j]:
                chosen.append(next(i for i in orders[j] if i not in chosen))
    left = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-round(q[i].mean(), 9), i))
    return set(chosen) | set(left[: n_keep - len(chosen)]), quotas


@pytest.mark.parametrize("seed,n,k,ties,skew", [(7, 60, 3, False, 0.0), (8, 97, 4, True, 0.6), (9, 200, 5, True, 1.5),
                                                (10, 150, 2, False, 3.0)])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37])
def test_mix_matches_brute_force(seed, n, k, ties, skew, fraction):
    mat = _random_table(seed, n, k, ties)
    mat[:, 0] += skew * mat[:, 0] ** 2  # a task whose scores run higher: more rows at home in it
    mat = mat.astype(np.float32).astype(np.float64)  # the values the float32 table holds
    out = select(_table(mat), fraction=fraction, method="mix")
    got = set(np.flatnonzero(np.asarray(out["selected"])).tolist())
    reference, quotas = _mix_reference(mat, int(fraction * n))
    assert got == reference
    sel = provenance(out)["selection"]
    assert list(sel["floor_rows_by_task"].values()) == quotas and sel["floor_rows_per_task"] == min(quotas)


def test_mix_sizes_floors_by_the_pool_mix():
    # 60 rows at home in task 0, 20 in task 1, 20 in task 2: a 20-row subset reserves 12, 4 and 4.
    rng = np.random.default_rng(11)
    mat = rng.random((100, 3)) * 0.1
    home = np.repeat([0, 1, 2], [60, 20, 20])
    mat[np.arange(100), home] += 1.0
    out = select(_table(mat), num_rows=20, method="mix")
    sel = provenance(out)["selection"]
    assert sel["floor_rows_by_task"] == {"t0": 12, "t1": 4, "t2": 4}
    assert sel["task_mix"] == pytest.approx({"t0": 0.6, "t1": 0.2, "t2": 0.2})
    picked = np.flatnonzero(np.asarray(out["selected"]))
    assert np.bincount(home[picked], minlength=3).tolist() == [12, 4, 4]
    # Equal floors instead keep 7, 7 and 6 (6 each, then the best mean rank).
    equal = np.flatnonzero(np.asarray(select(_table(mat), num_rows=20, method="gain")["selected"]))
    assert sorted(np.bincount(home[equal], minlength=3).tolist()) != [4, 4, 12]


def test_floor_quotas_split_by_largest_remainder():
    from icons_hf.consensus import floor_quotas

    assert floor_quotas(10, 1.0, 3) == [3, 3, 3]
    assert floor_quotas(10, 1.0, 3, [1, 1, 1]) == [4, 3, 3]
    assert floor_quotas(10, 0.5, 2, [0.7, 0.3]) == [4, 1]
    assert floor_quotas(7, 1.0, 3, [0.0, 1.0, 1.0]) == [0, 4, 3]
    with pytest.raises(ValueError, match="non-negative"):
        floor_quotas(10, 1.0, 2, [0.0, 0.0])


def test_mix_card_and_report_name_the_floors_per_task():
    from icons_hf.card import _method_text
    from icons_hf.report import _floor_text

    rng = np.random.default_rng(12)
    mat = rng.random((50, 2))
    mat[:35, 0] += 1.0
    mat[35:, 1] += 1.0
    sel = provenance(select(_table(mat), num_rows=10, method="mix"))["selection"]
    assert sel["floor_rows_by_task"] == {"t0": 7, "t1": 3}
    text = _method_text(sel)
    assert "in proportion to the pool's task mix (t0 7, t1 3 rows)" in text and "equal" not in text
    assert _floor_text(sel) == "100% of the subset reserved in proportion to the pool's task mix: t0 7, t1 3"
