"""Every kind of extension is one entry in one file: a toy feature type, projection, specialist and consensus rule,
each registered here with one decorator, reach the settings, the CLI, the extraction, the card and the report
without any other edit."""

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_gradients, compute_influence, export_selection, select, write_report
from icons_hf.cli import make_parser
from icons_hf.features import FEATURE_TYPES, PROJECTIONS, feature_type, projection
from icons_hf.rules import RULES, Ranking, consensus_rule
from icons_hf.settings import FeatureSettings, InfluenceSettings, SelectionSettings
from icons_hf.specialists import SPECIALISTS, specialist
from icons_hf.testing import tiny_lora_llama, token_rows


@pytest.fixture
def toys():
    @feature_type("toy_sign", description="the sign of every gradient coordinate (a toy)")
    class Sign:
        def __init__(self, *, state, settings, device):
            pass

        def describe(self):
            return {"toy": True}

        def __call__(self, name, grads):
            return grads.sign()

    @projection("toy_modulo", description="coordinate i into bucket i mod dim (a toy)")
    class Modulo:
        def __init__(self, *, seed, shapes, dim, device):
            self.dim = dim

        def describe(self):
            return {}

        def accumulate(self, out, name, grads):
            for start in range(0, grads.shape[1], self.dim):
                block = grads[:, start : start + self.dim]
                out[:, : block.shape[1]] += block

    @specialist("toy_best", per_example=False, axis_label="toy score", score_kind="toy scores")
    def best(products):
        """The best subtask's product, as a toy."""
        return products.max(axis=1)

    @consensus_rule("toy_min")
    def minimum(inputs):
        """``score(z) = min_k I_k(z)``, the weakest task decides."""
        return Ranking.of(inputs.matrix.min(axis=1))

    yield
    FEATURE_TYPES.pop("toy_sign")
    PROJECTIONS.pop("toy_modulo")
    SPECIALISTS.pop("toy_best")
    RULES.pop("toy_min")


def test_toy_entries_are_settings_and_cli_choices(toys):
    assert FeatureSettings(train_feature="toy_sign", projection="toy_modulo").train_feature == "toy_sign"
    assert InfluenceSettings(specialist="toy_best").specialist == "toy_best"
    assert SelectionSettings(method="toy_min").method == "toy_min"
    parser = make_parser()
    args = parser.parse_args(["gradients", "--model", "m", "--dataset", "d", "--output-dir", "o",
                              "--feature", "toy_sign", "--projection", "toy_modulo"])
    assert (args.feature, args.projection) == ("toy_sign", "toy_modulo")
    args = parser.parse_args(["influence", "--train", "t", "--output", "o", "--specialist", "toy_best"])
    assert args.specialist == "toy_best"
    assert parser.parse_args(["select", "scores", "--output", "o", "--method", "toy_min"]).method == "toy_min"
    gradients_help = parser._subparsers._group_actions[0].choices["gradients"].format_help()
    assert "the sign of every gradient coordinate (a toy)" in " ".join(gradients_help.split())


def test_toy_entries_run_end_to_end_and_describe_themselves(toys, tmp_path, one_torch_thread):
    model = tiny_lora_llama(seed=1)
    pool = Dataset.from_list(token_rows(12, seed=2))
    common = {"projection": "toy_modulo", "dim": 16, "dtype": "float32"}
    train = compute_gradients(model, pool, output_dir=tmp_path / "train", feature="toy_sign", **common)
    val = compute_gradients(model, Dataset.from_list(token_rows(3, seed=3)), output_dir=tmp_path / "val",
                            feature="sgd", **common)
    val_b = compute_gradients(model, Dataset.from_list(token_rows(3, seed=4)), output_dir=tmp_path / "val_b",
                              feature="sgd", **common)
    scores = compute_influence(train, {"a": val, "b": val_b}, specialist="toy_best")
    out = select(scores, fraction=0.25, method="toy_min")
    matrix = np.stack([np.asarray(out["influence_a"]), np.asarray(out["influence_b"])], axis=1)
    expected = sorted(np.lexsort((np.arange(12), -matrix.min(axis=1)))[:3].tolist())
    assert np.flatnonzero(out["selected"]).tolist() == expected
    export = export_selection(pool, out, tmp_path / "export")
    card = " ".join(open(tmp_path / "export" / "README.md", encoding="utf-8").read().split())
    assert "`toy_min`: `score(z) = min_k I_k(z)`, the weakest task decides" in card
    assert "The best subtask's product, as a toy" in card
    assert "feature `toy_sign` (the sign of every gradient coordinate (a toy))" in card
    assert "projection `toy_modulo` (coordinate i into bucket i mod dim (a toy))" in card
    report = " ".join(open(write_report(export), encoding="utf-8").read().split())
    assert "`toy_best` (toy scores)" in report and "Each task's score is its toy score." in report
    assert "`toy_min`: `score(z) = min_k I_k(z)`" in report
    assert "feature `toy_sign` (the sign of every gradient coordinate (a toy))" in report


def test_a_name_is_registered_once(toys):
    with pytest.raises(ValueError, match="already registered"):
        feature_type("sgd", description="again")(object)
    with pytest.raises(ValueError, match="already registered"):
        projection("toy_modulo", description="again")(object)
    with pytest.raises(ValueError, match="train_feature='nothing' is not supported"):
        FeatureSettings(train_feature="nothing")


def test_needs_optimizer_state_is_asked_of_the_entry(toys, tmp_path):
    assert FEATURE_TYPES["adam"].needs_optimizer_state and not FEATURE_TYPES["toy_sign"].needs_optimizer_state
    with pytest.raises(ValueError, match="feature='adam' needs optimizer_state"):
        compute_gradients(tiny_lora_llama(), Dataset.from_list(token_rows(2)), output_dir=tmp_path / "s",
                          feature="adam")
