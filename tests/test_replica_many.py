"""The many-task replica's harness (examples/replica): the pool generator's row kinds, shares and answers
checked against solvers written here, the harness's default rule against the library's default selection, and
its own rules (votes within per-task floors, even cluster sampling) against brute-force loops, and the batch order
both replicas train on (replica_common) against the loops each replica had before."""

import importlib
import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "replica")


@pytest.fixture(scope="module")
def many():
    sys.path.insert(0, HERE)
    try:
        modules = {name: importlib.import_module(f"many_{name}") for name in ("tasks", "rules")}
        yield {**modules, "common": importlib.import_module("replica_common")}
    finally:
        sys.path.remove(HERE)


def solve(segment: str, facts: dict) -> str:
    """The correct answer of a question segment, computed independently of the generator."""
    tag, body = segment[0], segment[1:-1]
    if tag == "A":
        return str((int(body[0]) + int(body[2])) % 10)
    if tag in "CG":
        a, b = int(body[0]), int(body[1])
        if tag == "G":
            return "Y" if a > b else "N"
        return "<" if a < b else ("=" if a == b else ">")
    answers = {
        "K": lambda: str(body.count("a")), "R": lambda: body[-1], "F": lambda: facts[body], "M": lambda: max(body),
        "P": lambda: "+" if sum(c in "abcd" for c in body) >= 3 else "-",
        "E": lambda: "Y" if int(body) % 2 == 0 else "N", "I": lambda: "Y" if body[0] in body[1:] else "N",
        "S": lambda: min(body), "T": lambda: body[0],
    }
    return answers[tag]()


@pytest.mark.parametrize("pool,seed", [("M1", 0), ("M2", 3)])
def test_pool_kinds_shares_and_answers(many, pool, seed):
    tasks = many["tasks"]
    spec, size = tasks.POOLS[pool], 1000
    facts = tasks.fact_table(seed)
    rows = tasks.build_pool(spec, size, seed, facts, set())
    kinds = Counter(r["kind"] for r in rows)
    assert len(rows) == size
    for kind, share in spec.kinds.items():
        assert abs(kinds[kind] - share * size) <= 1, (kind, kinds[kind])
    harmful = sum(kinds[k] for k in ("wrong", "noise", "off_task")) / size
    assert 0.30 <= harmful <= 0.40
    target_tags = {"A", "C", "K", "R", "F", "M", "P", "E", "I", "G"}
    for row in rows:
        segs = row["segments"]
        if row["kind"] == "generalist":
            assert 2 <= len(segs) <= 3 and len({tasks_of(q) for q, _ in segs}) == len(segs)
        elif row["kind"] == "near_duplicate":
            assert row["prefix"] == "." and any(o["segments"] == segs and o["kind"] in ("single", "generalist")
                                                for o in rows)
        else:
            assert len(segs) == 1 and row["prefix"] == ""
        for q, a in segs:
            if row["kind"] == "wrong":
                assert a != solve(q, facts) and a in tasks.ANSWERS[row["task"]]
            elif row["kind"] == "noise":
                assert q[0] in target_tags
            else:
                assert a == solve(q, facts), row
        if row["kind"] == "off_task":
            assert segs[0][0][0] in "ST"
    singles = Counter(r["task"] for r in rows if r["kind"] == "single")
    ranked = sorted(spec.task_shares, key=spec.task_shares.get, reverse=True)
    assert singles[ranked[0]] > singles[ranked[-1]]  # unequal task shares


def tasks_of(segment: str) -> str:
    return {"E": "yesno", "I": "yesno", "G": "yesno"}.get(segment[0], segment[0])


def test_validation_and_tests_are_balanced(many):
    tasks = many["tasks"]
    rng = np.random.default_rng(0)
    facts = tasks.fact_table(0)
    val = tasks.balanced_questions("max", 20, rng, facts, distinct=True)
    assert len({q for q, _ in val}) == 20
    counts = Counter(a for _, a in val)
    assert max(counts.values()) - min(counts.values()) <= 1
    with pytest.raises(ValueError, match="distinct questions"):
        tasks.balanced_questions("yesno/even", 20, rng, facts, distinct=True)


def score_table(seed: int, n: int, k: int):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    mat = rng.normal(size=(n, k)) + rng.normal(size=(n, 1))  # a shared component: rows good for several tasks
    return Dataset.from_dict({"index": np.arange(n),
                              **{f"influence_t{j}": mat[:, j].astype(np.float32) for j in range(k)}})


@pytest.mark.parametrize("seed,n,k,fraction", [(0, 400, 8, 0.2), (1, 333, 3, 0.05), (2, 1000, 10, 0.4)])
def test_default_rule_is_the_library_default(many, seed, n, k, fraction):
    from icons_hf import select

    table = score_table(seed, n, k)
    ours = many["rules"].select_rows("default", fraction, balanced=table, mean=table, features=None, seed=seed)
    library = np.flatnonzero(np.asarray(select(table, fraction=fraction)["selected"]))
    np.testing.assert_array_equal(ours, library)
    assert len(ours) == math.floor(fraction * n)


def floor_vote_reference(mat: np.ndarray, n_keep: int) -> set:
    """Tasks take turns; each takes its best untaken row by (above its 80th percentile, votes, score, -index)."""
    n, k = mat.shape
    thresholds = [np.percentile(mat[:, j], 80) for j in range(k)]
    votes = [sum(mat[i, j] > thresholds[j] for j in range(k)) for i in range(n)]
    taken: set = set()
    while len(taken) < n_keep:
        for j in range(k):
            if len(taken) == n_keep:
                break
            best = max((i for i in range(n) if i not in taken),
                       key=lambda i: (mat[i, j] > thresholds[j], votes[i], mat[i, j], -i))
            taken.add(best)
    return taken


@pytest.mark.parametrize("seed,n,k,n_keep", [(0, 120, 8, 24), (1, 90, 3, 40), (2, 200, 10, 13)])
def test_floor_vote_matches_a_loop(many, seed, n, k, n_keep):
    mat = np.asarray(score_table(seed, n, k).to_pandas().drop(columns="index"), dtype=np.float64)
    ours = many["rules"].floor_vote(mat, n_keep)
    assert set(ours.tolist()) == floor_vote_reference(mat, n_keep)


@pytest.mark.parametrize("n_keep", [10, 64, 150])
def test_even_cluster_sample(many, n_keep):
    rules = many["rules"]
    labels = np.repeat(np.arange(5), [3, 40, 40, 60, 57])
    chosen = rules.even_cluster_sample(labels, n_keep, seed=0)
    assert len(chosen) == n_keep == len(set(chosen.tolist()))
    per = Counter(labels[chosen].tolist())
    small_full = per[0] == 3 or n_keep < 15
    others = [per[c] for c in range(1, 5)]
    assert small_full and max(others) - min(others) <= 1 + (n_keep % 4 > 0)


def old_batch_order(n: int, batch_size: int, steps: int, seed: int, cap_at_epoch_end: bool) -> list[list[int]]:
    """The two replicas' batch loops as they were written before they shared one generator: the many-task one
    capped the position in a new epoch at its end, the easy-VQA one did not."""
    generator = torch.Generator().manual_seed(seed)
    order, pos, out = torch.randperm(n, generator=generator), 0, []
    for _ in range(steps):
        if pos + batch_size > n:
            take = order[pos:]
            order = torch.randperm(n, generator=generator)
            pos = min(n, batch_size - len(take)) if cap_at_epoch_end else batch_size - len(take)
            batch = torch.cat([take, order[:pos]])
        else:
            batch, pos = order[pos : pos + batch_size], pos + batch_size
        out.append(batch.tolist())
    return out


@pytest.mark.parametrize("cap_at_epoch_end", [True, False])
@pytest.mark.parametrize("n,batch_size,steps", [(100, 32, 20), (64, 16, 9), (5, 8, 7), (3, 8, 6), (1, 4, 3),
                                                (40, 40, 5), (31, 7, 30)])
def test_shared_batch_order_matches_both_old_loops(many, n, batch_size, steps, cap_at_epoch_end):
    seed = int(np.random.default_rng().integers(2**31))
    ours = [b.tolist() for b in many["common"].fixed_step_batches(n, batch_size, steps, seed)]
    assert ours == old_batch_order(n, batch_size, steps, seed, cap_at_epoch_end)
    assert len(ours) == steps and all(0 <= i < n for b in ours for i in b)


def test_clean_pool_has_no_harmful_rows_and_a_third_conversation_rows(many):
    tasks, harness = many["tasks"], importlib.import_module("many_harness")
    spec, size, seed = tasks.POOLS["M-clean"], 1200, 4
    facts = tasks.fact_table(seed)
    rows = tasks.build_pool(spec, size, seed, facts, set())
    kinds = Counter(r["kind"] for r in rows)
    assert not any(kinds[k] for k in ("wrong", "noise", "off_task")) and kinds["near_duplicate"] > 0
    assert kinds["generalist"] / size >= 0.30
    asked = Counter()
    for row in rows:
        for q, a in row["segments"]:
            assert a == solve(q, facts), row  # every answer of every row is right
        if row["kind"] == "generalist":
            asked[len(row["segments"])] += 1
            assert len({tasks_of(q) for q, _ in row["segments"]}) == len(row["segments"])
    assert set(asked) == {2, 3, 4}
    comp = harness.composition(rows, np.arange(size))
    assert comp["harmful_share"] == 0 and comp["multi_task"] >= kinds["generalist"]
    assert comp["rows_by_task"]["add"] == sum(any(q[0] == "A" for q, _ in r["segments"]) for r in rows)
    with pytest.raises(ValueError, match="generalist_tasks"):
        tasks.PoolSpec(kinds={"single": 1.0}, task_shares={"add": 1.0}, generalist_tasks=(1, 3))


@pytest.mark.parametrize("rule,kwargs", [("gain", dict(method="gain")), ("veto", dict(method="veto")),
                                         ("rank", dict(method="rank")), ("mix", dict(method="mix")),
                                         ("blend", dict(method="random", task_floor=0.5, seed=7))])
def test_candidate_rules_are_the_library_calls(many, rule, kwargs):
    from icons_hf import select

    table = score_table(3, 500, 8)
    ours = many["rules"].select_rows(rule, 0.2, balanced=table, mean=table, features=None, seed=7)
    library = np.flatnonzero(np.asarray(select(table, fraction=0.2, **kwargs)["selected"]))
    np.testing.assert_array_equal(ours, library)
    assert len(ours) == 100


def test_candidate_tests_follow_the_decision_rule():
    sys.path.insert(0, HERE)
    try:
        candidates = importlib.import_module("candidates")
    finally:
        sys.path.remove(HERE)
    per = {"random": {0: 100.0, 1: 98.0, 2: 102.0}, "default": {0: 110.0, 1: 109.0, 2: 111.0},
           "floor0": {0: 95.0, 1: 92.0, 2: 97.0}, "full": {0: 100.0, 1: 100.0, 2: 100.0}}
    group = candidates.seed_group(per, [0, 1, 2])
    assert group["default"]["difference_vs_random"] == pytest.approx([10.0, 1.0])
    assert group["default"]["passes"] and group["floor0"]["loses_to_random"]
    assert group["floor0"]["loses_to"] == ["random", "default"] and not group["floor0"]["passes"]
    assert "difference_vs_random" not in group["random"] and group["full"]["relative"] == [100.0, 0.0]


def test_candidates_run_end_to_end(tmp_path):
    sys.path.insert(0, HERE)
    try:
        script = importlib.import_module("replica_many")
        reports = tmp_path / "report"
        script.main(["--output_dir", str(tmp_path / "runs"), "--report_dir", str(reports), "--seeds", "0",
                     "--pools", "M-clean", "--candidates", "--report_name", "many_candidates", "--pool_size", "120",
                     "--validation_per_task", "4", "--test_per_leaf", "6", "--base_rows", "40", "--base_steps", "2",
                     "--warmup_fraction", "0.1", "--warmup_epochs", "1", "--warmup_batch_size", "4",
                     "--checkpoints", "1", "--dim", "64", "--train_steps", "2", "--workers", "1"])
    finally:
        sys.path.remove(HERE)
    summary = json.loads((reports / "candidates_many.json").read_text())
    entry = summary["pools"]["M-clean"]
    assert set(entry["relative_per_seed"]) == {"default", "floor50", "floor0", "paper", "gain", "veto", "rank", "mix",
                                               "blend", "random", "full"}
    kept = entry["kept"]
    assert kept["full"]["rows"] == 120 and all(k["rows"] == 24 and k["harmful_share"] == 0
                                               for name, k in kept.items() if name != "full")
    assert kept["full"]["generalist_share"] >= 0.30
    paired = entry["relative_per_seed"]["gain"]["0"] - entry["relative_per_seed"]["random"]["0"]
    assert entry["groups"]["choice"]["gain"]["difference_vs_random"][0] == pytest.approx(paired)
    assert "decision_rule.md" in (reports / "many_candidates.md").read_text()
