"""The API reference builds from the docstrings (pdoc), one page per module, and no docstring reference is broken."""

import importlib.util
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.py"


@pytest.fixture(scope="module")
def api():
    spec = importlib.util.spec_from_file_location("icons_hf_docs_api", API)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_docstring_reference_names_something(api):
    assert api.broken_references() == []


def test_the_reference_check_finds_a_broken_one(api):
    assert api.resolves("icons_hf.consensus.select", "icons_hf.rules.vote_hits")
    assert api.resolves("icons_hf.pools.Pool", "write_subset")  # relative to the enclosing class
    assert api.resolves("icons_hf.influence_cache", "icons_hf.influence_plan.InfluencePlan.fingerprint")
    assert not api.resolves("icons_hf.consensus.select", "icons_hf.rules.no_such_rule")
    assert not api.resolves("icons_hf.pools.Pool", "write_everything")


def test_api_reference_has_a_page_per_module(api, tmp_path):
    index = api.build(tmp_path)
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    modules = api.public_modules()
    assert index.is_file() and {"icons_hf/features.html", "icons_hf/gradients/extractor.html"} <= pages
    assert {m.replace(".", "/") + ".html" for m in modules} <= pages
    select_page = (tmp_path / "icons_hf" / "consensus.html").read_text(encoding="utf-8")
    assert re.search(r'href="[^"]*#SelectionSettings"', select_page)  # :class: references became links
