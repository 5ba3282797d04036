"""Target tasks and pools of the real-model replica (SmolLM2-135M-Instruct): short chat questions with short
answers, generated from small tables in this file, and pools R-clean / R-noisy built from them.

Seven target tasks of different kinds and answer spaces; ``yesno`` is given as three subtasks (scored as MME is):

=============  =====================================================  ======================================
task           question                                               answers
=============  =====================================================  ======================================
add            What is 23 + 45?                                       20 .. 118 (numbers)
capital        What is the capital of Peru?                           40 capital cities
sentiment      Is the word "gloomy" positive or negative?             positive / negative
larger         Which is larger, 37 or 52?                             10 .. 99 (one of the two)
month          What month is 3 months after January?                  12 months
reverse        Spell "cat" backwards.                                 45 3-letter words, reversed
yesno/even     Is 14 an even number?                                  yes / no
yesno/capital  Is Rome the capital of Italy?                          yes / no
yesno/longer   Is "house" longer than "cat"?                          yes / no
=============  =====================================================  ======================================

A pool row is a chat ``{"messages": [...], "kind", "tasks"}``: ``single`` (one question), ``conversation`` (2-4
questions of different tasks in one chat, every answer supervised, as LLaVA-665K's multi-question rows),
``near_duplicate`` (a single row asked again, politely); R-noisy also has harmful rows: ``wrong``
(a wrong answer from the task's answer space), ``off_task`` (questions of no target task), ``garbled``
(scrambled question and answer). Row kinds are hidden from every rule.
"""

from __future__ import annotations

import numpy as np

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Germany": "Berlin",
    "Russia": "Moscow", "China": "Beijing", "India": "Delhi", "Chile": "Santiago", "Cuba": "Havana",
    "Poland": "Warsaw", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Ecuador": "Quito", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
}
POSITIVE = ("happy", "wonderful", "bright", "kind", "lovely", "great", "joyful", "calm", "brave", "gentle",
            "cheerful", "pleasant", "friendly", "excellent", "warm", "proud", "delightful", "hopeful", "sweet",
            "fresh", "clever", "honest", "lucky", "graceful")
NEGATIVE = ("sad", "awful", "gloomy", "cruel", "nasty", "bad", "angry", "bitter", "cowardly", "harsh", "dreary",
            "unpleasant", "hostile", "terrible", "cold", "ashamed", "dreadful", "hopeless", "sour", "stale",
            "foolish", "dishonest", "unlucky", "clumsy")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WORDS = ("cat", "dog", "sun", "hat", "pen", "cup", "box", "bed", "car", "map", "red", "fog", "jam", "kit", "log",
         "mud", "net", "owl", "pig", "rat", "tin", "van", "web", "yak", "zip", "ant", "bus", "cow", "elf", "fox",
         "gum", "hen", "ink", "jet", "key", "lip", "mop", "nut", "oak", "pot", "rug", "sky", "toy", "urn", "wax")
LONG_WORDS = ("house", "garden", "window", "pencil", "rabbit", "basket", "candle", "planet", "forest", "bottle",
              "orange", "silver", "market", "kitten", "button", "rocket")
TEMPLATES = {
    "add": "What is {a} + {b}?",
    "capital": "What is the capital of {c}?",
    "sentiment": 'Is the word "{w}" positive or negative?',
    "larger": "Which is larger, {a} or {b}?",
    "month": "What month is {k} months after {m}?",
    "reverse": 'Spell "{w}" backwards.',
    "yesno/even": "Is {a} an even number?",
    "yesno/capital": "Is {city} the capital of {c}?",
    "yesno/longer": 'Is "{w}" longer than "{v}"?',
}
TARGETS = ("add", "capital", "sentiment", "larger", "month", "reverse", "yesno")
SUBTASKS = {"yesno": ("even", "capital", "longer")}
# Leaves whose question space is large: their validation and test questions are kept out of the pool.
LARGE_SPACE = ("add", "larger", "yesno/even")


def leaf_tasks(task: str) -> list[str]:
    return [f"{task}/{s}" for s in SUBTASKS[task]] if task in SUBTASKS else [task]


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def question(leaf: str, rng, *, answer: str | None = None) -> tuple[str, str]:
    """A ``(question, answer)`` of ``leaf``; ``answer`` asks for a question with that answer (answer-balanced
    sets)."""
    template = TEMPLATES[leaf]
    if leaf == "add":
        a, b = int(rng.integers(10, 60)), int(rng.integers(10, 60))
        return template.format(a=a, b=b), str(a + b)
    if leaf == "capital":
        country = _pick(rng, sorted(CAPITALS)) if answer is None else next(c for c, v in CAPITALS.items()
                                                                            if v == answer)
        return template.format(c=country), CAPITALS[country]
    if leaf == "sentiment":
        label = answer or _pick(rng, ("positive", "negative"))
        return template.format(w=_pick(rng, POSITIVE if label == "positive" else NEGATIVE)), label
    if leaf == "larger":
        a, b = rng.choice(np.arange(10, 100), 2, replace=False)
        return template.format(a=int(a), b=int(b)), str(int(max(a, b)))
    if leaf == "month":
        k, m = int(rng.integers(1, 6)), int(rng.integers(12))
        if answer is not None:
            m = (MONTHS.index(answer) - k) % 12
        return template.format(k=k, m=MONTHS[m]), MONTHS[(m + k) % 12]
    if leaf == "reverse":
        word = _pick(rng, WORDS)
        return template.format(w=word), word[::-1]
    label = answer or _pick(rng, ("yes", "no"))
    yes = label == "yes"
    if leaf == "yesno/even":
        a = int(rng.integers(5, 50)) * 2 + (0 if yes else 1)
        return template.format(a=a), label
    if leaf == "yesno/capital":
        country = _pick(rng, sorted(CAPITALS))
        city = CAPITALS[country] if yes else _pick(rng, sorted(v for c, v in CAPITALS.items() if c != country))
        return template.format(city=city, c=country), label
    if leaf == "yesno/longer":
        long_word, short_word = _pick(rng, LONG_WORDS), _pick(rng, WORDS)
        w, v = (long_word, short_word) if yes else (short_word, long_word)
        return template.format(w=w, v=v), label
    raise ValueError(f"unknown task {leaf!r}")


def answer_space(leaf: str) -> tuple[str, ...] | None:
    """The closed answer set of a leaf (for answer-balanced questions); ``None`` for open ones."""
    if leaf == "capital":
        return tuple(sorted(CAPITALS.values()))
    if leaf == "sentiment":
        return ("positive", "negative")
    if leaf == "month":
        return MONTHS
    if leaf.startswith("yesno/"):
        return ("yes", "no")
    return None


def balanced_questions(leaf: str, n: int, rng, *, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct questions of ``leaf``, answers cycling through its answer space where it is closed."""
    space = answer_space(leaf)
    start = int(rng.integers(len(space))) if space else 0
    out, seen = [], set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n:
            raise ValueError(f"cannot draw {n} distinct questions of {leaf!r}.")
        wanted = None if space is None else space[(start + len(out)) % len(space)]
        q, a = question(leaf, rng, answer=wanted)
        if q in seen:
            continue
        seen.add(q)
        out.append((q, a))
    return out


def wrong_answer(leaf: str, right: str, rng) -> str:
    space = answer_space(leaf)
    if space is not None:
        return _pick(rng, [a for a in space if a != right])
    if leaf == "reverse":
        return _pick(rng, [w for w in WORDS if w[::-1] != right])[::-1]
    return str(int(right) + int(_pick(rng, (-11, -10, -2, -1, 1, 2, 10, 11))))


OFF_TASK = (
    ('How many letters are in "{w}"?', lambda w: str(len(w))),
    ('What is the first letter of "{w}"?', lambda w: w[0]),
    ('Write "{w}" in capital letters.', lambda w: w.upper()),
)


def off_task_question(rng) -> tuple[str, str]:
    template, answer = OFF_TASK[int(rng.integers(len(OFF_TASK)))]
    word = _pick(rng, WORDS + LONG_WORDS)
    return template.format(w=word), answer(word)


def garble(text: str, rng) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def chat(pairs) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


# Pool mixes: task shares of single questions (unequal, as in a real pool), and row-kind shares.
TASK_SHARES = {"add": 0.22, "capital": 0.10, "sentiment": 0.16, "larger": 0.14, "month": 0.10, "reverse": 0.10,
               "yesno": 0.18}
POOLS = {
    "R-clean": {"conversation": 0.40, "near_duplicate": 0.10, "wrong": 0.0, "off_task": 0.0, "garbled": 0.0},
    "R-noisy": {"conversation": 0.40, "near_duplicate": 0.10, "wrong": 0.14, "off_task": 0.08, "garbled": 0.08},
}
HARMFUL = ("wrong", "off_task", "garbled")
KINDS = ("single", "conversation", "near_duplicate", *HARMFUL)


def _draw_task(rng) -> str:
    names = list(TASK_SHARES)
    return names[int(rng.choice(len(names), p=np.array([TASK_SHARES[t] for t in names])))]


def _draw_leaf(rng, task: str | None = None) -> str:
    task = task or _draw_task(rng)
    return _pick(rng, leaf_tasks(task))


def _clean_question(rng, excluded: set[str], leaf: str) -> tuple[str, str]:
    while True:
        q, a = question(leaf, rng)
        if q not in excluded:
            return q, a


def build_pool(name: str, size: int, seed: int, excluded: set[str]) -> list[dict]:
    """``size`` rows of pool ``name`` (a mix of :data:`POOLS`), shuffled with ``seed``; questions in ``excluded``
    (validation and test questions of large-space leaves) never appear."""
    mix = POOLS[name]
    rng = np.random.default_rng([seed, 31, sorted(POOLS).index(name)])
    counts = {kind: int(round(share * size)) for kind, share in mix.items()}
    counts["single"] = size - sum(counts.values())
    rows = []
    for _ in range(counts["single"]):
        leaf = _draw_leaf(rng)
        rows.append({"kind": "single", "tasks": [leaf.split("/")[0]], "messages": chat([_clean_question(rng, excluded,
                                                                                                          leaf)])})
    for _ in range(counts["conversation"]):
        n_q = int(rng.integers(2, 5))
        tasks = []
        while len(tasks) < n_q:
            task = _draw_task(rng)
            if task not in tasks:
                tasks.append(task)
        pairs = [_clean_question(rng, excluded, _draw_leaf(rng, t)) for t in tasks]
        rows.append({"kind": "conversation", "tasks": tasks, "messages": chat(pairs)})
    singles = [r for r in rows if r["kind"] == "single"]
    for _ in range(counts["near_duplicate"]):
        source = singles[int(rng.integers(len(singles)))]
        q, a = source["messages"][0]["content"], source["messages"][1]["content"]
        rows.append({"kind": "near_duplicate", "tasks": source["tasks"],
                     "messages": chat([(_reword(q), a)])})
    for _ in range(counts["wrong"]):
        leaf = _draw_leaf(rng)
        q, a = _clean_question(rng, excluded, leaf)
        rows.append({"kind": "wrong", "tasks": [leaf.split("/")[0]], "messages": chat([(q, wrong_answer(leaf, a,
                                                                                                         rng))])})
    for _ in range(counts["off_task"]):
        rows.append({"kind": "off_task", "tasks": [], "messages": chat([off_task_question(rng)])})
    for _ in range(counts["garbled"]):
        leaf = _draw_leaf(rng)
        q, a = _clean_question(rng, excluded, leaf)
        rows.append({"kind": "garbled", "tasks": [leaf.split("/")[0]], "messages": chat([(garble(q, rng),
                                                                                           garble(a + "xq", rng))])})
    order = rng.permutation(len(rows))
    return [rows[int(i)] for i in order]


def _reword(q: str) -> str:
    """The same question with a polite suffix."""
    return q[:-1] + ", please?" if q.endswith("?") else q[:-1] + ", please."
