"""Smaller edges a new user hits: a subset sized two ways, and scores whose features are not the preset's (a
warning, and the provenance and card saying which features the scores came from)."""

import json
import logging
import os

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_gradients, compute_influence, export_selection, select
from icons_hf.provenance import provenance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_select_refuses_fraction_and_num_rows_together():
    rng = np.random.default_rng(0)
    table = Dataset.from_dict({"index": list(range(20)), "influence_a": rng.normal(size=20).tolist()})
    with pytest.raises(ValueError, match=r"both fraction=0.2 and num_rows=10.*pass one"):
        select(table, fraction=0.2, num_rows=10)
    assert sum(select(table, num_rows=10)["selected"]) == 10
    assert sum(select(table, fraction=0.25)["selected"]) == 5


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from icons_hf.testing import tiny_lora_llama, token_rows

    tmp = tmp_path_factory.mktemp("feature_settings")
    model = tiny_lora_llama(seed=0)
    pool, val = Dataset.from_list(token_rows(8, seed=1)), Dataset.from_list(token_rows(2, seed=2))
    out = {}
    for name, kwargs in {"default": {}, "paper": {"preset": "paper"}}.items():
        out[name] = (compute_gradients(model, pool, output_dir=tmp / name / "train", show_progress=False, **kwargs),
                     compute_gradients(model, val, output_dir=tmp / name / "val", show_progress=False, **kwargs))
    return tmp, pool, out


def test_paper_preset_on_default_features_warns_and_the_card_says_which_features(stores, caplog):
    tmp, pool, built = stores
    train, val = built["default"]
    with caplog.at_level(logging.WARNING, logger="icons_hf.influence"):
        scores = compute_influence(train, {"t": val}, preset="paper")
    warned = [r.getMessage() for r in caplog.records if "preset='paper'" in r.getMessage()]
    assert len(warned) == 1
    assert "parameters='trainable', preset 'lora'" in warned[0] and "projection='countsketch'" in warned[0]
    features = provenance(scores)["features"]
    assert features["settings"]["projection"] == "countsketch" and features["presets"] == ["default"]
    out = export_selection(pool, select(scores, fraction=0.5, preset="paper"), tmp / "export")
    card = open(os.path.join(out, "README.md")).read()
    assert "Feature settings of the stores: `train_feature=\"sgd\"`, `parameters=\"trainable\"`" in card
    assert "those of the `default` preset" in card
    assert json.load(open(os.path.join(out, "selection.json")))["features"]["settings"]["dim"] == 8192


def test_paper_preset_on_paper_features_is_quiet(stores, caplog):
    tmp, _, built = stores
    train, val = built["paper"]
    with caplog.at_level(logging.WARNING, logger="icons_hf.influence"):
        scores = compute_influence(train, {"t": val}, preset="paper")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert provenance(scores)["features"]["presets"] == ["paper"]
    assert provenance(scores)["features"]["settings"]["parameters"] == "lora"


def test_report_explains_a_selected_mean_below_the_pool_mean(tmp_path):
    from icons_hf import write_report

    rng = np.random.default_rng(3)
    n = 300
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
               for i in range(n)]
    (tmp_path / "pool.json").write_text(json.dumps(records))
    x = rng.normal(size=n)
    # Tasks b and c want exactly the rows task a likes least: a's share of the subset is a third, the rest ranks low.
    table = Dataset.from_dict({"index": list(range(n)), "influence_a": x.tolist(),
                               "influence_b": (-x + 0.1 * rng.normal(size=n)).tolist(),
                               "influence_c": (-x + 0.1 * rng.normal(size=n)).tolist()})
    export = export_selection(str(tmp_path / "pool.json"), select(table, fraction=0.3), tmp_path / "export")
    markdown = open(write_report(export), encoding="utf-8").read()
    data = json.load(open(os.path.join(export, "report", "report.json")))
    ranks = data["mean_percentile_rank"]
    assert ranks["a"]["selected"] < ranks["a"]["pool"] and ranks["b"]["selected"] > ranks["b"]["pool"]
    assert "The selected rows' mean rank is below the pool's for `a`: the subset also holds the rows picked" in markdown
