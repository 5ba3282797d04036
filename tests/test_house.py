"""Registries, settings wiring, datasets caching, provenance and row identity of influence and selection."""

import ast
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

import icons_hf.consensus as consensus
import icons_hf.influence as influence
from icons_hf import compute_influence, select
from icons_hf.provenance import Provenance, provenance
from icons_hf.rules import RULES, Ranking, consensus_rule
from icons_hf.settings import InfluenceSettings, SelectionSettings
from icons_hf.specialists import SPECIALISTS, specialist
from icons_hf.testing import write_store


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(21)
    train = write_store(tmp_path / "train", rng.normal(size=(40, 6)), shard_size=16)
    tasks = {
        "a": write_store(tmp_path / "a", rng.normal(size=(3, 6))),
        "b": write_store(tmp_path / "b", rng.normal(size=(4, 6))),
    }
    return train, tasks


def count_calls(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("specialist_name", ["mean", "balanced"])
def test_unchanged_influence_rerun_is_served_from_cache(stores, monkeypatch, tmp_path, specialist_name):
    train, tasks = stores
    calls = count_calls(monkeypatch, influence, "score_batch")
    first = compute_influence(train, tasks, specialist=specialist_name, batch_size=8)
    assert len(calls) == 5  # 40 rows in batches of 8
    again = compute_influence(train, tasks, specialist=specialist_name, batch_size=16)  # batch size: same scores
    assert len(calls) == 5 and again.cache_files == first.cache_files
    assert again.to_dict() == first.to_dict() and provenance(again) == provenance(first)
    # Other settings are other scores: recomputed, in their own cache file.
    other = compute_influence(train, tasks, specialist="zscore" if specialist_name == "balanced" else "mean_released")
    assert len(calls) > 5 and other.cache_files != first.cache_files
    # An explicit cache file holding scores of other inputs is recomputed and replaced, never returned.
    path = str(tmp_path / "scores.arrow")
    compute_influence(train, {"a": tasks["a"]}, specialist=specialist_name, cache_file_name=path)
    mine = compute_influence(train, tasks, specialist=specialist_name, cache_file_name=path)
    assert mine.to_dict() == first.to_dict()


def test_num_proc_gives_the_same_scores(stores):
    train, tasks = stores
    for name in ("mean", "balanced"):
        one = compute_influence(train, tasks, specialist=name, batch_size=8)
        two = compute_influence(train, tasks, specialist=name, batch_size=8, num_proc=2, cache_file_name=None,
                                settings=None, work_dir=None, preset=None, checkpoint_weights=[1.0])
        assert two.to_dict() == one.to_dict()


def test_unchanged_selection_rerun_reuses_the_cached_map(stores, monkeypatch):
    train, tasks = stores
    scores = compute_influence(train, tasks)
    calls = count_calls(monkeypatch, consensus, "add_rows_columns")
    first = select(scores, fraction=0.25, preset="paper")
    assert calls and first.cache_files
    n = len(calls)
    again = select(compute_influence(train, tasks), fraction=0.25, preset="paper")
    assert len(calls) == n and again.cache_files == first.cache_files
    assert again["selected"] == first["selected"]
    select(scores, fraction=0.3, preset="paper")
    assert len(calls) > n


def test_provenance_survives_datasets_operations(stores, tmp_path):
    train, tasks = stores
    out = select(compute_influence(train, tasks, preset="paper"), fraction=0.25, preset="paper")
    info = provenance(out)
    assert info["influence"]["settings"] == InfluenceSettings.from_preset("paper").to_dict()
    assert info["selection"]["settings"] == SelectionSettings.from_preset("paper", fraction=0.25).to_dict()
    out.save_to_disk(str(tmp_path / "saved"))
    operations = {
        "map": lambda t: t.map(lambda b: {"twice": [2 * v for v in b["index"]]}, batched=True),
        "sort": lambda t: t.sort("influence_a"),
        "select": lambda t: t.select([3, 1, 2]),
        "filter": lambda t: t.filter(lambda r: r["selected"]),
        "add_column": lambda t: t.add_column("x", list(range(len(t)))),
        "load_from_disk": lambda t: load_from_disk(str(tmp_path / "saved")),
    }
    for name, operation in operations.items():
        assert provenance(operation(out)) == info, name
    typed = Provenance.of(out)
    assert typed.influence["specialist"] == "mean" and typed.selection["method"] == "vote"
    assert Provenance.from_dict(typed.to_dict()) == typed


def test_record_hash_travels_into_the_score_table_in_pool_order(tmp_path):
    rng = np.random.default_rng(22)
    feats = rng.normal(size=(13, 6))
    hashes = [f"h{i:02d}" for i in range(13)]
    parts = [write_store(tmp_path / "p0", feats[:5], record_hashes=hashes[:5]),
             write_store(tmp_path / "p1", feats[5:], shard_size=3, record_hashes=hashes[5:])]
    val = write_store(tmp_path / "v", rng.normal(size=(3, 6)))
    for name in ("mean", "balanced"):
        scores = compute_influence([parts], {"t": [val]}, specialist=name, batch_size=4)
        assert scores["record_hash"] == hashes and scores["index"] == list(range(13))
        assert select(scores, fraction=0.5)["record_hash"] == hashes
    plain = compute_influence(write_store(tmp_path / "plain", feats), {"t": val})
    assert "record_hash" not in plain.column_names
    with pytest.raises(ValueError, match="no record_hash column"):
        compute_influence([[parts[0], tmp_path / "plain"]], {"t": [val]})


def test_a_registered_rule_and_specialist_are_one_function_each(stores):
    train, tasks = stores

    @consensus_rule("min")
    def minimum(inputs):
        """score(z) = min_k I_k(z)."""
        return Ranking.of(inputs.matrix.min(axis=1))

    @specialist("best", per_example=True)
    def best(columns, n_rows):
        """I_k(z) = max_v c_v(z)."""
        return np.max(np.stack(list(columns)), axis=0)

    try:
        assert SelectionSettings(method="min").method == "min" and InfluenceSettings(specialist="best")
        scores = compute_influence(train, tasks, specialist="best")
        out = select(scores, fraction=0.25, method="min")
        mat = np.stack([np.asarray(scores["influence_a"]), np.asarray(scores["influence_b"])], axis=1)
        expected = sorted(np.argsort(-mat.min(axis=1), kind="stable")[:10].tolist())
        assert np.flatnonzero(out["selected"]).tolist() == expected
    finally:
        RULES.pop("min", None)
        SPECIALISTS.pop("best", None)
    with pytest.raises(ValueError, match="method='min' is not supported"):
        SelectionSettings(method="min")
    with pytest.raises(ValueError, match="already registered"):
        consensus_rule("vote")(minimum)


PACKAGE = Path(influence.__file__).parent
MODULES = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
# The CLI's subcommands import their stage when they run, so that `icons-hf --help` does not load torch,
# transformers and every stage; everywhere else an import inside a function would hide a cycle.
LAZY_IMPORTS_ALLOWED = {"cli.py"}


def is_package_import(node) -> bool:
    """``from .x import ...``, ``from icons_hf.x import ...`` or ``import icons_hf.x``."""
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == "icons_hf"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "icons_hf" for a in node.names)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def house_violations(source: str, module: str) -> list[str]:
    """Functions of 60 lines or more, private names imported from the package, package imports inside functions."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1  # signature and docstring included
            if lines >= MAX_FUNCTION_LINES:
                found.append(f"{module}: {node.name} is {lines} lines")
            if module not in LAZY_IMPORTS_ALLOWED:
                found += [f"{module}: {node.name} imports {ast.unparse(inner)!r} inside the function"
                          for inner in ast.walk(node) if inner is not node and is_package_import(inner)]
        if isinstance(node, ast.ImportFrom) and is_package_import(node):
            private = [a.name for a in node.names if is_private(a.name)]
            if private:
                found.append(f"{module}: imports private names {private} from {'.' * node.level}{node.module or ''}")
    return found


def test_house_rules_cover_every_module_of_the_package():
    assert {"influence.py", "cli.py", "gradients/extractor.py", "metrics/__init__.py"} <= set(MODULES)
    assert "metrics/exact_match/exact_match.py" in MODULES  # recursive: the metric scripts too


@pytest.mark.parametrize("module", MODULES)
def test_house_modules_have_short_functions_and_no_hidden_or_private_imports(module):
    assert house_violations((PACKAGE / module).read_text(encoding="utf-8"), module) == []


def test_house_no_module_is_over_600_lines():
    lengths = {m: len((PACKAGE / m).read_text(encoding="utf-8").splitlines()) for m in MODULES}
    assert {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES} == {}
    assert max(lengths.values()) > 100  # the lengths were read (no empty files)


LONG = "def f():\n" + "    x = 1\n" * 58  # 59 lines with the signature


@pytest.mark.parametrize("module,source,expected", [
    ("m.py", LONG, []),
    ("m.py", LONG + "    return x\n", ["m.py: f is 60 lines"]),
    ("m.py", "class C:\n    " + (LONG + "    return x\n").replace("\n", "\n    "), ["m.py: f is 60 lines"]),
    ("m.py", "from .store import _private, __version__, public\n",
     ["m.py: imports private names ['_private'] from .store"]),
    ("m.py", "from icons_hf.store import _private\n",
     ["m.py: imports private names ['_private'] from icons_hf.store"]),
    ("m.py", "from numpy import _private\n", []),
    ("m.py", "def f():\n    from .store import load\n",
     ["m.py: f imports 'from .store import load' inside the function"]),
    ("m.py", "def f():\n    import icons_hf.store\n",
     ["m.py: f imports 'import icons_hf.store' inside the function"]),
    ("m.py", "def f():\n    from datasets import Dataset\n", []),
    ("cli.py", "def f():\n    from .store import load\n", []),
])
def test_house_rules_find_what_they_forbid(module, source, expected):
    assert house_violations(source, module) == expected


@pytest.mark.parametrize("specialist_name", ["mean", "balanced"])
def test_a_pool_with_every_row_skipped_scores_to_an_empty_table(tmp_path, specialist_name):
    train = write_store(tmp_path / "t", np.zeros((3, 6)), skip=range(3))
    val = write_store(tmp_path / "v", np.random.default_rng(0).normal(size=(2, 6)))
    scores = compute_influence(train, {"a": val}, specialist=specialist_name)
    assert len(scores) == 0 and scores.column_names == ["index", "influence_a"]
    assert [s["index"] for s in provenance(scores)["influence"]["skipped"]] == [0, 1, 2]


@pytest.mark.parametrize("cls,argv,expected", [
    (InfluenceSettings, ["--specialist", "mean_released", "--checkpoint_weights", "0.5", "1.5", "--num_proc", "2"],
     {"specialist": "mean_released", "checkpoint_weights": (0.5, 1.5), "num_proc": 2}),
    (SelectionSettings,
     ["--method", "rank", "--fraction", "0.05", "--threshold_inclusive", "true", "--task_floor", "0"],
     {"method": "rank", "fraction": 0.05, "threshold_inclusive": True, "task_floor": 0.0}),
])
def test_settings_parse_from_the_command_line_with_registry_choices(cls, argv, expected):
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(argv)
    assert {k: getattr(parsed, k) for k in expected} == expected
    with pytest.raises(SystemExit):
        HfArgumentParser(cls).parse_args_into_dataclasses([argv[0], "no-such-choice"])


def test_selected_rows_filters_the_selection_in_table_order():
    table = Dataset.from_dict({"index": [4, 2, 9, 7], "influence_a": [0.1, 0.9, 0.5, 0.7]})
    out = select(table, fraction=0.5, method="mean")
    rows = consensus.selected_rows(out)
    assert rows["index"] == [2, 7] and provenance(rows) == provenance(out)
    with pytest.raises(ValueError, match="no 'selected' column"):
        consensus.selected_rows(table)
