"""compute_influence: scores equal a brute-force loop over checkpoints, tasks and subtasks; mismatched stores are
refused. (Streaming, caching and parts: tests/test_scale.py and tests/test_house.py.)"""

import numpy as np
import pytest

from icons_hf import compute_influence
from icons_hf.testing import write_store


def brute_force_influence(train, val, weights):
    """sum_c w_c mean_v cos(g_z^c, g_v^c), one row and one validation example at a time."""
    out = np.zeros(len(train[0]))
    for z in range(len(train[0])):
        for c, w in enumerate(weights):
            total = 0.0
            for v in val[c]:
                g = train[c][z]
                total += float(np.dot(g, v) / (np.linalg.norm(g) * np.linalg.norm(v)))
            out[z] += w * total / len(val[c])
    return out


def test_influence_matches_brute_force_with_checkpoints_and_subtasks(tmp_path):
    rng = np.random.default_rng(1234)
    n, dim = 23, 6
    train = [rng.normal(size=(n, dim)) for _ in range(2)]
    lrs = [3e-4, 1e-4]
    paths = [
        write_store(tmp_path / f"train{c}", train[c], learning_rate=lrs[c], checkpoint=f"ckpt-{c}", weights=f"w{c}")
        for c in range(2)
    ]
    val = {name: [rng.normal(size=(k, dim)) for _ in range(2)] for name, k in (("a", 5), ("b1", 3), ("b2", 4))}
    vpaths = {
        name: [write_store(tmp_path / f"{name}{c}", val[name][c], weights=f"w{c}") for c in range(2)] for name in val
    }
    scores = compute_influence(
        paths, {"a": vpaths["a"], "b": {"b1": vpaths["b1"], "b2": vpaths["b2"]}}, specialist="mean"
    )
    weights = [lr / sum(lrs) for lr in lrs]
    expected_a = brute_force_influence(train, val["a"], weights)
    expected_b = np.maximum(
        brute_force_influence(train, val["b1"], weights), brute_force_influence(train, val["b2"], weights)
    )
    assert scores.column_names == ["index", "influence_a", "influence_b"]
    np.testing.assert_array_equal(scores["index"], np.arange(n))
    np.testing.assert_allclose(scores["influence_a"], expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["influence_b"], expected_b, rtol=1e-5, atol=1e-6)
    # Explicit weights override the recorded learning rates.
    equal = compute_influence(paths, {"a": vpaths["a"]}, checkpoint_weights=[1, 1], specialist="mean")
    np.testing.assert_allclose(
        equal["influence_a"], brute_force_influence(train, val["a"], [0.5, 0.5]), rtol=1e-5, atol=1e-6
    )


def test_influence_refuses_mismatched_stores(tmp_path):
    rng = np.random.default_rng(0)
    train = write_store(tmp_path / "train", rng.normal(size=(4, 6)))
    other_dim = write_store(tmp_path / "val8", rng.normal(size=(3, 8)))
    with pytest.raises(ValueError, match="projection"):
        compute_influence(train, {"t": other_dim})
    other_ckpt = write_store(tmp_path / "val_other", rng.normal(size=(3, 6)), weights="elsewhere")
    with pytest.raises(ValueError, match="other model weights"):
        compute_influence(train, {"t": other_ckpt})
    with pytest.raises(ValueError, match="one validation store per checkpoint"):
        compute_influence(train, {"t": [other_ckpt, other_ckpt]})
