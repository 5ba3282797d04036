"""Selection variants: the per-example specialists (balanced, zscore), the per-task floor of select(), and the
Adam-term diagnostics, each against an independent loop-based reference on fresh random inputs."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from icons_hf import compute_influence, select
from icons_hf.provenance import provenance
from icons_hf.testing import write_store
from icons_hf.variants import adam_feature_diagnostics, pairwise_cosine


def reference_rank(values, i):
    """Percentile rank of values[i]: (rows below + half the other rows equal to it) / (n - 1)."""
    below = sum(1 for v in values if v < values[i])
    equal = sum(1 for v in values if v == values[i]) - 1
    return (below + equal / 2) / (len(values) - 1)


def test_per_example_specialists_match_loops(tmp_path):
    rng = np.random.default_rng(7)
    n, dim, lrs = 17, 5, [2e-4, 1e-4]
    train = [rng.normal(size=(n, dim)) for _ in lrs]
    train_paths = [write_store(tmp_path / f"train{c}", train[c], learning_rate=lrs[c], weights=f"w{c}")
                   for c in range(2)]
    val = {name: [rng.normal(size=(k, dim)) for _ in lrs] for name, k in (("a", 4), ("b1", 2), ("b2", 3))}
    paths = {
        name: [write_store(tmp_path / f"{name}{c}", val[name][c], weights=f"w{c}") for c in range(2)] for name in val
    }
    tasks = {"a": paths["a"], "b": {"b1": paths["b1"], "b2": paths["b2"]}}
    weights = [lr / sum(lrs) for lr in lrs]

    def cos(x, y):
        return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))

    def columns(names):
        out = []
        for name in names:
            for v in range(len(val[name][0])):
                out.append(
                    [sum(w * cos(train[c][z], val[name][c][v]) for c, w in enumerate(weights)) for z in range(n)]
                )
        return out

    def quota(names):
        cols = columns(names)
        return [max(reference_rank(col, z) for col in cols) for z in range(n)]

    def zscore(names):
        cols = columns(names)
        stats = [(sum(col) / n, math.sqrt(sum((x - sum(col) / n) ** 2 for x in col) / n)) for col in cols]
        return [
            sum((col[z] - mu) / sd for col, (mu, sd) in zip(cols, stats, strict=True)) / len(cols) for z in range(n)
        ]

    for specialist, expected in (("balanced", quota), ("zscore", zscore)):
        scores = compute_influence(train_paths, tasks, specialist=specialist)
        assert scores.column_names == ["index", "influence_a", "influence_b"]
        np.testing.assert_array_equal(scores["index"], np.arange(n))
        np.testing.assert_allclose(scores["influence_a"], expected(["a"]), atol=1e-5)
        np.testing.assert_allclose(scores["influence_b"], expected(["b1", "b2"]), atol=1e-5)
        # It plugs into select() like compute_influence's table, and says which specialist made it.
        assert sum(select(scores, fraction=0.3)["selected"]) == math.floor(0.3 * n)
        info = provenance(scores)["influence"]
        assert info["specialist"] == specialist
        assert info["checkpoint_weights"] == pytest.approx(weights)
        # Streamed in small batches, the scores are the same.
        direct = compute_influence(train_paths, tasks, specialist=specialist, batch_size=3, cache_file_name=None)
        assert direct.to_dict() == scores.to_dict()
    default = compute_influence(train_paths, tasks)
    assert default.to_dict() == compute_influence(train_paths, tasks, specialist="balanced").to_dict()


def test_per_example_specialist_refuses_mismatched_stores(tmp_path):
    rng = np.random.default_rng(0)
    train = write_store(tmp_path / "train", rng.normal(size=(5, 4)))
    other = write_store(tmp_path / "val", rng.normal(size=(3, 4)), weights="elsewhere")
    with pytest.raises(ValueError, match="other model weights"):
        compute_influence(train, {"t": other}, specialist="balanced")
    with pytest.raises(ValueError, match="checkpoint_weights"):
        compute_influence(train, {"t": write_store(tmp_path / "v2", rng.normal(size=(3, 4)))}, checkpoint_weights=[-1])


def reference_floor_select(mat, n_keep, floor, primary):
    """Turn-taking floors by task score, then the primary score fills the rest (ties by index)."""
    n, k = mat.shape
    per_task = math.floor(floor * n_keep / k)
    chosen = []
    for _ in range(per_task):
        for j in range(k):
            best = max((z for z in range(n) if z not in chosen), key=lambda z: (mat[z, j], -z))
            chosen.append(best)
    rest = sorted((z for z in range(n) if z not in chosen), key=lambda z: (-primary[z], z))
    return sorted(chosen + rest[: n_keep - len(chosen)])


@pytest.mark.parametrize("floor,fraction", [(0.5, 0.3), (1.0, 0.25), (0.2, 0.5)])
def test_task_floor_matches_reference(floor, fraction):
    rng = np.random.default_rng(int(floor * 100 + fraction * 10))
    n = 40
    mat = rng.normal(size=(n, 3))
    mat[:, 1] = mat[:, 0] + 0.01 * rng.normal(size=n)  # two tasks that like the same rows: floors must not double count
    table = Dataset.from_dict({"index": np.arange(n), **{f"influence_{t}": mat[:, j] for j, t in enumerate("abc")}})
    out = select(table, fraction=fraction, method="mean", task_floor=floor)
    n_keep = math.floor(fraction * n)
    got = sorted(np.flatnonzero(out["selected"]).tolist())
    assert got == reference_floor_select(mat.astype(np.float32).astype(np.float64), n_keep, floor,
                                         mat.astype(np.float32).astype(np.float64).mean(axis=1))


def test_task_floor_keeps_a_starved_task_by_default():
    rng = np.random.default_rng(3)
    n = 60
    a = rng.normal(size=n)
    # Tasks a and b agree; task c likes other rows, so the vote alone gives c's favourites one vote at most.
    table = Dataset.from_dict({"index": np.arange(n), "influence_a": a, "influence_b": a + 0.05 * rng.normal(size=n),
                               "influence_c": -a + 0.05 * rng.normal(size=n)})
    paper = np.asarray(select(table, fraction=0.2, task_floor=0.0)["selected"])
    c_top = set(np.argsort(-np.asarray(table["influence_c"]))[:4].tolist())
    assert not c_top & set(np.flatnonzero(paper).tolist())  # the paper's vote starves task c
    default = np.asarray(select(table, fraction=0.2)["selected"])
    np.testing.assert_array_equal(default, np.asarray(select(table, fraction=0.2, task_floor=1.0)["selected"]))
    assert c_top <= set(np.flatnonzero(default).tolist())
    with pytest.raises(ValueError, match="task_floor"):
        select(table, fraction=0.2, task_floor=1.5)


def test_adam_feature_diagnostics_matches_per_example_autograd(tiny_lora_llama, token_rows, tmp_path):
    model = tiny_lora_llama(seed=11)
    rows = token_rows(6, seed=5)
    dataset = Dataset.from_list(rows)
    gen = torch.Generator().manual_seed(2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    state = {
        n: {"exp_avg": 0.01 * torch.randn(params[n].shape, generator=gen),
            "exp_avg_sq": 1e-4 * torch.rand(params[n].shape, generator=gen), "step": 3}
        for n in names
    }
    out = adam_feature_diagnostics(model, dataset, state, batch_size=4, work_dir=tmp_path / "diag")

    model.eval()
    feats, moms, grads = [], [], []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        f, m, g = [], [], []
        for n in names:
            grad = params[n].grad.detach().reshape(-1).double()
            m0 = state[n]["exp_avg"].reshape(-1).double()
            v = 0.999 * state[n]["exp_avg_sq"].reshape(-1).double() + 0.001 * grad**2
            denom = torch.sqrt(v + 1e-8)
            f.append((0.9 * m0 + 0.1 * grad) / denom)
            m.append(0.9 * m0 / denom)
            g.append(grad)
        feats.append(torch.cat(f))
        moms.append(torch.cat(m))
        grads.append(torch.cat(g))
    share = np.mean([float(m.norm() / f.norm()) for f, m in zip(feats, moms, strict=True)])
    mom_cos = np.mean([float(torch.dot(f, m) / (f.norm() * m.norm())) for f, m in zip(feats, moms, strict=True)])

    def mean_pairwise(vectors):
        vals = [
            float(torch.dot(x, y) / (x.norm() * y.norm()))
            for i, x in enumerate(vectors)
            for j, y in enumerate(vectors)
            if i != j
        ]
        return np.mean(vals)

    assert out["rows"] == 6
    assert out["momentum_share"] == pytest.approx(share, rel=1e-4)
    assert out["momentum_cosine"] == pytest.approx(mom_cos, rel=1e-4)
    assert out["pairwise_cosine_adam"] == pytest.approx(mean_pairwise(feats), rel=1e-4, abs=1e-6)
    assert out["pairwise_cosine_sgd"] == pytest.approx(mean_pairwise(grads), rel=1e-4, abs=1e-6)
    # The optimizer state is read, never written.
    assert all(torch.equal(state[n]["exp_avg"], s["exp_avg"]) for n, s in state.items())


def test_pairwise_cosine_of_a_store(tmp_path):
    feats = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    path = write_store(tmp_path / "s", feats)
    expected = np.mean([0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert pairwise_cosine(path, rows=3) == pytest.approx(expected, rel=1e-6)
