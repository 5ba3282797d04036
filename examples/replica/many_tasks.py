"""Synthetic many-task material for the many-task replica: a character vocabulary, eight target tasks of
different kinds and answer spaces (one of them, ``yesno``, made of three subtasks as MME is), two off-task
tasks, and the pool generator with its hidden row kinds.

A row is a short character sequence: ``^`` then one or more segments ``<tag><question>:<answer>;``. The answer is
one character of the task's answer space and the only supervised token of its segment. A single-task row has one
segment; a *generalist* row has two or three segments of different target tasks (two to four in ``M-clean``, all
correct), so one row teaches several tasks at once, as a multi-question conversation does.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

DIGITS = string.digits
LETTERS = "abcdefgh"
ENTITY_LETTERS = "ijklmnop"
# Token 0 pads (its value never matters: padding is masked); "^" starts every row.
VOCAB = ["<pad>", "^", ":", ";", "+", "-", "<", "=", ">", "Y", "N", *DIGITS, *LETTERS, *ENTITY_LETTERS,
         "A", "C", "K", "R", "F", "M", "P", "E", "I", "G", "S", "T", "."]
TOKEN = {t: i for i, t in enumerate(VOCAB)}
PAD_ID = 0

# Target task -> answer space. ``yesno`` is the MME-like task: its subtasks share the answer space.
ANSWERS = {
    "add": list(DIGITS),          # A: (a + b) mod 10, b in {1, 2}
    "compare": ["<", "=", ">"],   # C: a vs b
    "count": list("0123456"),     # K: how many 'a' in six letters of 'abc'
    "last": list(LETTERS),        # R: last letter of a word (first letter of its reversal)
    "fact": list(LETTERS),        # F: an invented table entity -> letter
    "max": list(DIGITS),          # M: largest of four digits
    "sentiment": ["+", "-"],      # P: do 'good' letters (a-d) outnumber 'bad' ones (e-h) in five letters
    "yesno": ["Y", "N"],          # subtasks: even (E), contains (I), greater (G)
}
TARGETS = tuple(ANSWERS)
SUBTASKS = {"yesno": ("even", "contains", "greater")}
OFF_TASK = ("sort", "first")      # S: smallest letter of a word; T: first digit of a number
OFF_ANSWERS = {"sort": list(LETTERS), "first": list(DIGITS)}
ALL_ANSWERS = {**ANSWERS, **OFF_ANSWERS}
NUM_ENTITIES = 12


def fact_table(seed: int) -> dict[str, str]:
    """The invented fact table of a seed: ``NUM_ENTITIES`` two-letter entities -> a letter."""
    rng = np.random.default_rng([seed, 77])
    names = [a + b for a in ENTITY_LETTERS for b in ENTITY_LETTERS]
    chosen = rng.choice(len(names), NUM_ENTITIES, replace=False)
    return {names[i]: LETTERS[int(rng.integers(len(LETTERS)))] for i in chosen}


def _word(rng, alphabet: str, n: int) -> str:
    return "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=n))


def question(task: str, rng: np.random.Generator, facts: dict[str, str]) -> tuple[str, str]:
    """One ``(segment text without the answer, answer)`` of ``task`` (a target, a subtask ``yesno/<sub>`` or an
    off-task task)."""
    if task == "add":
        a, b = int(rng.integers(10)), 1 + int(rng.integers(2))
        return f"A{a}+{b}:", str((a + b) % 10)
    if task == "compare":
        a, b = rng.integers(10, size=2)
        return f"C{a}{b}:", "<" if a < b else ("=" if a == b else ">")
    if task == "count":
        w = _word(rng, "abc", 6)
        return f"K{w}:", str(w.count("a"))
    if task == "last":
        w = _word(rng, LETTERS, 4)
        return f"R{w}:", w[-1]
    if task == "fact":
        name = list(facts)[int(rng.integers(len(facts)))]
        return f"F{name}:", facts[name]
    if task == "max":
        d = _word(rng, DIGITS, 4)
        return f"M{d}:", max(d)
    if task == "sentiment":
        w = _word(rng, LETTERS, 5)
        return f"P{w}:", "+" if sum(c in "abcd" for c in w) > 2 else "-"
    if task == "yesno/even":
        d = int(rng.integers(10))
        return f"E{d}:", "Y" if d % 2 == 0 else "N"
    if task == "yesno/contains":
        c, w = LETTERS[int(rng.integers(8))], _word(rng, LETTERS, 4)
        return f"I{c}{w}:", "Y" if c in w else "N"
    if task == "yesno/greater":
        a, b = rng.integers(10, size=2)
        return f"G{a}{b}:", "Y" if a > b else "N"
    if task == "sort":
        w = _word(rng, LETTERS, 4)
        return f"S{w}:", min(w)
    if task == "first":
        d = _word(rng, DIGITS, 3)
        return f"T{d}:", d[0]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TARGETS + OFF_TASK)} and yesno/<subtask>.")


def leaf_tasks(task: str) -> list[str]:
    """The question generators of a target task (its subtasks for ``yesno``)."""
    return [f"{task}/{s}" for s in SUBTASKS[task]] if task in SUBTASKS else [task]


def balanced_questions(task: str, n: int, rng, facts, *, distinct: bool,
                       allow_fewer: bool = False) -> list[tuple[str, str]]:
    """``n`` questions of ``task`` (a leaf), answers as balanced as the answer space allows (round robin over the
    answers that occur); ``distinct``: no question twice (validation), else questions may repeat (test scores
    accuracy on the task's answer-balanced distribution, whose question space may be small); ``allow_fewer``: a task
    with fewer distinct questions gives them all instead of an error."""
    by_answer: dict[str, list] = {}
    seen = set()
    for _ in range(300 * n):
        q, a = question(task, rng, facts)
        if not (distinct and q in seen):
            seen.add(q)
            by_answer.setdefault(a, []).append((q, a))
    out, answers = [], sorted(by_answer)
    i = 0
    while len(out) < n and any(by_answer.values()):
        bucket = by_answer[answers[i % len(answers)]]
        if bucket:
            out.append(bucket.pop())
        i += 1
    if len(out) < n and not allow_fewer:
        raise ValueError(f"task {task!r} gave only {len(out)} distinct questions; ask for fewer than {n}.")
    return out


@dataclass(frozen=True)
class PoolSpec:
    """A pool's mix: row kinds (shares of the pool) and the target tasks' shares of the single-task rows."""

    kinds: dict[str, float]
    task_shares: dict[str, float]
    description: str = ""
    harmful: tuple[str, ...] = field(default=("wrong", "noise", "off_task"))
    generalist_tasks: tuple[int, int] = (2, 3)  # fewest and most target tasks a generalist row asks about

    def __post_init__(self):
        for name, shares in (("kinds", self.kinds), ("task_shares", self.task_shares)):
            if abs(sum(shares.values()) - 1) > 1e-9:
                raise ValueError(f"PoolSpec {name} must sum to 1, got {sum(shares.values())}.")
        low, high = self.generalist_tasks
        if not 2 <= low <= high <= len(TARGETS):
            raise ValueError(f"PoolSpec generalist_tasks={self.generalist_tasks} must be (fewest, most) with "
                             f"2 <= fewest <= most <= {len(TARGETS)}.")


POOLS = {
    "M1": PoolSpec(
        kinds={"single": 0.40, "generalist": 0.15, "near_duplicate": 0.10, "wrong": 0.15, "noise": 0.10,
               "off_task": 0.10},
        task_shares={"add": 0.24, "compare": 0.18, "count": 0.14, "max": 0.12, "last": 0.10, "yesno": 0.10,
                     "sentiment": 0.07, "fact": 0.05},
        description="35% harmful, 15% generalist rows; add/compare dominate the single-task rows",
    ),
    "M2": PoolSpec(
        kinds={"single": 0.42, "generalist": 0.08, "near_duplicate": 0.10, "wrong": 0.20, "noise": 0.08,
               "off_task": 0.12},
        task_shares={"fact": 0.22, "sentiment": 0.18, "yesno": 0.16, "last": 0.13, "max": 0.11, "count": 0.09,
                     "compare": 0.06, "add": 0.05},
        description="40% harmful, 8% generalist rows; the shares of M1 reversed",
    ),
    # The paper's own regime: no harmful row, and a third of the pool conversation-like rows that answer questions
    # of 2-4 target tasks (every answer supervised), as LLaVA-665K's multi-question conversations do.
    "M-clean": PoolSpec(
        kinds={"single": 0.55, "generalist": 0.35, "near_duplicate": 0.10},
        task_shares={"add": 0.24, "compare": 0.18, "count": 0.14, "max": 0.12, "last": 0.10, "yesno": 0.10,
                     "sentiment": 0.07, "fact": 0.05},
        description="no harmful rows, 35% generalist (conversation) rows of 2-4 tasks; M1's task shares",
        generalist_tasks=(2, 4),
    ),
}


def _pick_task(rng, shares: dict[str, float]) -> str:
    names = list(shares)
    return names[int(rng.choice(len(names), p=np.array([shares[n] for n in names])))]


def _leaf(rng, task: str) -> str:
    leaves = leaf_tasks(task)
    return leaves[int(rng.integers(len(leaves)))]


def _wrong(rng, answer: str, space: list[str]) -> str:
    others = [a for a in space if a != answer]
    return others[int(rng.integers(len(others)))]


def make_row(kind: str, rng, spec: PoolSpec, facts, exclude: set[str]) -> tuple[list[tuple[str, str]], str]:
    """One pool row of ``kind``: its segments ``[(question, answer), ...]`` and its main task."""
    while True:
        task = _pick_task(rng, spec.task_shares)
        if kind == "generalist":
            low, high = spec.generalist_tasks
            n = low + int(rng.integers(high - low + 1))
            others = [t for t in TARGETS if t != task]
            tasks = [task, *[others[int(i)] for i in rng.choice(len(others), n - 1, replace=False)]]
            segments = [question(_leaf(rng, t), rng, facts) for t in tasks]
        elif kind == "off_task":
            off = OFF_TASK[int(rng.integers(len(OFF_TASK)))]
            segments, task = [question(off, rng, facts)], off
        else:
            q, a = question(_leaf(rng, task), rng, facts)
            space = ANSWERS[task]
            if kind == "wrong":
                a = _wrong(rng, a, space)
            elif kind == "noise":
                # An unreadable input: the task's tag, then random characters; the answer is random too.
                q = q[0] + _word(rng, DIGITS + LETTERS + "+<>=", len(q) - 2) + ":"
                a = space[int(rng.integers(len(space)))]
            segments = [(q, a)]
        if not any(q in exclude for q, _ in segments):
            return segments, task


def build_pool(spec: PoolSpec, size: int, seed: int, facts, exclude: set[str]) -> list[dict]:
    """``size`` rows in random order; each a dict with ``segments``, ``kind`` (hidden from the rules) and ``task``.
    Near-duplicates copy a single-task or generalist row with a filler character inserted after its start."""
    rng = np.random.default_rng([seed, 11])
    counts = {k: int(round(share * size)) for k, share in spec.kinds.items()}
    counts["single"] += size - sum(counts.values())
    rows = []
    for kind in ("single", "generalist", "wrong", "noise", "off_task"):
        for _ in range(counts.get(kind, 0)):
            segments, task = make_row(kind, rng, spec, facts, exclude)
            rows.append({"segments": segments, "kind": kind, "task": task, "prefix": ""})
    sources = [r for r in rows if r["kind"] in ("single", "generalist")]
    for i in rng.integers(len(sources), size=counts.get("near_duplicate", 0)):
        rows.append({**sources[int(i)], "kind": "near_duplicate", "prefix": "."})
    return [rows[int(i)] for i in rng.permutation(len(rows))]


def encode(segments, prefix: str = "") -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` (-100 except on the answer tokens) of a row."""
    ids, labels = [TOKEN["^"], *(TOKEN[c] for c in prefix)], [-100] * (1 + len(prefix))
    for q, a in segments:
        ids += [TOKEN[c] for c in q] + [TOKEN[a], TOKEN[";"]]
        labels += [-100] * len(q) + [TOKEN[a], -100]
    return ids, labels
