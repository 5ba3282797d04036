"""Streaming influence and vectorised selection: exact against brute force, batch-by-batch, bounded memory."""

import json
import math
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
from datasets import Dataset

from icons_hf import compute_influence, load_gradients, select
from icons_hf.ranks import percentile_ranks
from icons_hf.store import iter_store_batches
from icons_hf.testing import write_store


def brute_force_influence(train, val, weights):
    out = np.zeros(len(train[0]))
    for z in range(len(train[0])):
        for c, w in enumerate(weights):
            g = train[c][z].astype(np.float64)
            out[z] += w * np.mean([g @ v / (np.linalg.norm(g) * np.linalg.norm(v)) for v in val[c].astype(np.float64)])
    return out


def test_store_streams_in_read_only_batches_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(23, 5)).astype(np.float32)
    path = write_store(tmp_path / "s", feats, shard_size=7, dtype="float16")
    batches = list(iter_store_batches(path, batch_size=3))
    # Shards of 7 read 3 rows at a time: 3, 3, 1 per shard, then the last shard of 2.
    assert [len(b[0]) for b in batches] == [3, 3, 1] * 3 + [2]
    index = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(index, np.arange(23))
    block = batches[0][1]
    assert block.dtype == np.float16 and not block.flags.writeable
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), feats.astype(np.float16))
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), np.asarray(load_gradients(path)["norm"]))
    with pytest.raises(ValueError, match="batch_size=0"):
        next(iter_store_batches(path, batch_size=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc")
def test_streaming_keeps_resident_memory_to_about_one_batch(tmp_path):
    # One shard of 4000 x 4096 float16 (31 MiB): only releasing pages as the batches go by keeps it out of memory.
    rng = np.random.default_rng(1)
    path = write_store(tmp_path / "big", rng.standard_normal((4000, 4096), dtype=np.float32), dtype="float16")

    def rss_file_kib():
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("RssFile:"))

    before = rss_file_kib()
    peak, total = before, 0.0
    for _, features, _ in iter_store_batches(path, batch_size=250):
        total += float(features[:, ::512].astype(np.float32).sum())  # touches every page of the batch
        peak = max(peak, rss_file_kib())
    store_kib = 4000 * 4096 * 2 / 1024
    assert math.isfinite(total)
    assert peak - before < 0.25 * store_kib, (
        f"resident file pages grew by {peak - before} KiB over a {store_kib} KiB store"
    )


def float16_checkpoints(tmp_path, seed, rows, val_rows, shard_sizes):
    """Two checkpoints' float16 train stores (different shard sizes: rows are matched by index across batch
    boundaries) and float32 validation stores of random 6-dim features."""
    rng = np.random.default_rng(seed)
    train = [rng.normal(size=(rows, 6)) for _ in range(2)]
    val = [rng.normal(size=(val_rows, 6)) for _ in range(2)]
    tpaths = [write_store(tmp_path / f"t{c}", train[c], shard_size=shard_sizes[c], dtype="float16", weights=f"w{c}")
              for c in range(2)]
    vpaths = [write_store(tmp_path / f"v{c}", val[c], weights=f"w{c}") for c in range(2)]
    return train, val, tpaths, vpaths


def record_map_batches(monkeypatch) -> list:
    """Rows of every batch the influence map function scores."""
    import icons_hf.influence as influence

    seen = []
    real = influence.score_batch

    def recording(batch, positions, **kwargs):
        seen.append(len(batch))
        return real(batch, positions, **kwargs)

    monkeypatch.setattr(influence, "score_batch", recording)
    return seen


def test_influence_maps_train_stores_in_batches(tmp_path, monkeypatch):
    train, val, tpaths, vpaths = float16_checkpoints(tmp_path, 2, 31, 4, (5, 7))
    seen = record_map_batches(monkeypatch)
    scores = compute_influence(tpaths, {"task": vpaths}, checkpoint_weights=[1, 3], batch_size=4, specialist="mean")
    assert set(seen) <= {1, 2, 3, 4} and sum(seen) == 31
    stored = [t.astype(np.float16).astype(np.float32) for t in train]  # what a float16 store holds
    expected = brute_force_influence(stored, val, [0.25, 0.75])
    np.testing.assert_array_equal(scores["index"], np.arange(31))
    np.testing.assert_allclose(scores["influence_task"], expected, rtol=2e-3, atol=2e-4)


def brute_force_balanced(train, val, weights):
    """max over validation examples of the row's within-pool percentile rank of its weighted cosine, by counting."""
    n = len(train[0])
    cols = []
    for v in range(len(val[0])):
        col = []
        for z in range(n):
            col.append(sum(
                w * float(np.dot(train[c][z], val[c][v]) / (np.linalg.norm(train[c][z]) * np.linalg.norm(val[c][v])))
                for c, w in enumerate(weights)))
        cols.append(col)
    return [max((sum(x < col[z] for x in col) + (sum(x == col[z] for x in col) - 1) / 2) / (n - 1) for col in cols)
            for z in range(n)]


def test_balanced_influence_streams_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import icons_hf.influence as influence

    train, val, tpaths, vpaths = float16_checkpoints(tmp_path, 5, 29, 5, (4, 9))
    seen = record_map_batches(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    scores = compute_influence(tpaths, {"task": vpaths}, checkpoint_weights=[1, 3], batch_size=4, work_dir=work)
    assert set(seen) <= {1, 2, 3, 4} and sum(seen) == 29
    assert list(work.iterdir()) == []  # the temporary cosine file is gone
    stored = [t.astype(np.float16).astype(np.float32).astype(np.float64) for t in train]
    np.testing.assert_array_equal(scores["index"], np.arange(29))
    np.testing.assert_allclose(scores["influence_task"], brute_force_balanced(stored, val, [0.25, 0.75]), atol=1e-6)
    cache = str(tmp_path / "scores.arrow")
    on_disk = compute_influence(
        tpaths, {"task": vpaths}, checkpoint_weights=[1, 3], batch_size=4, cache_file_name=cache
    )
    assert on_disk.to_dict() == scores.to_dict()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("icons_cosines_")] == []

    # An error midway still removes the temporary file.
    def interrupted(*args, **kwargs):
        assert len(list(work.iterdir())) == 1  # the cosine file exists while the examples are combined
        raise KeyboardInterrupt

    monkeypatch.setattr(influence, "combine_examples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_influence(
            tpaths, {"task": vpaths}, batch_size=4, work_dir=work, cache_file_name=tmp_path / "other.arrow"
        )
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("specialist", ["balanced", "zscore", "mean"])
def test_pool_in_parts_scores_as_one_store(tmp_path, specialist):
    """Parts of a pool (e.g. image and text-only rows) given together score exactly as one store of all rows."""
    rng = np.random.default_rng(11)
    feats = [rng.normal(size=(19, 5)) for _ in range(2)]
    val = {
        t: [write_store(tmp_path / f"{t}{c}", rng.normal(size=(3, 5)), weights=f"w{c}") for c in range(2)]
        for t in "ab"
    }
    whole = [write_store(tmp_path / f"whole{c}", feats[c], skip={3, 12}, shard_size=4, weights=f"w{c}")
             for c in range(2)]
    parts = [[write_store(tmp_path / f"p{c}a", feats[c][:8], skip={3}, shard_size=4, weights=f"w{c}"),
              write_store(tmp_path / f"p{c}b", feats[c][8:], skip={4}, shard_size=4, weights=f"w{c}")]
             for c in range(2)]
    one = compute_influence(whole, val, specialist=specialist, batch_size=5)
    split = compute_influence(parts, val, specialist=specialist, batch_size=5)
    assert split.to_dict() == one.to_dict()
    assert 3 not in one["index"] and 12 not in one["index"] and len(one) == 17
    info = json.loads(split.info.description)["influence"]
    assert [s["index"] for s in info["skipped"]] == [3, 12] and info["pool_rows"] == 19
    # Parts of other checkpoints (other weights) are refused.
    with pytest.raises(ValueError, match="differ in weights"):
        compute_influence([[parts[0][0], parts[1][1]], parts[1]], val)


def test_balanced_specialist_matches_validation_examples_across_checkpoints(tmp_path, monkeypatch):
    rng = np.random.default_rng(12)
    train = [write_store(tmp_path / f"t{c}", rng.normal(size=(9, 4)), weights=f"w{c}") for c in range(2)]
    feats = rng.normal(size=(4, 4))
    # The same 4 validation rows, but row 1 skipped at checkpoint 0 and row 2 at checkpoint 1: 3 rows each.
    val = [write_store(tmp_path / "v0", feats, skip={1}, shard_size=4, weights="w0"),
           write_store(tmp_path / "v1", feats, skip={2}, shard_size=4, weights="w1")]
    with pytest.raises(ValueError, match="other rows"):
        compute_influence(train, {"t": val})
    assert len(compute_influence(train, {"t": val}, specialist="mean")) == 9  # one mean vector per checkpoint
    # The cosine file's folder must exist and have room; the error names the argument.
    with pytest.raises(ValueError, match="work_dir .* does not exist"):
        compute_influence(train[0], {"t": val[0]}, work_dir=tmp_path / "missing")
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 10))
    with pytest.raises(ValueError, match="GiB free; pass work_dir"):
        compute_influence(train[0], {"t": val[0]}, work_dir=tmp_path)


def test_influence_cache_file_and_default_cache_agree(tmp_path):
    rng = np.random.default_rng(3)
    train = write_store(tmp_path / "train", rng.normal(size=(50, 8)), shard_size=16)
    tasks = {
        "a": write_store(tmp_path / "a", rng.normal(size=(3, 8))),
        "b": write_store(tmp_path / "b", rng.normal(size=(5, 8))),
    }
    default = compute_influence(train, tasks, batch_size=7)
    # datasets' convention for map results: cache-<fingerprint>.arrow beside the input's files.
    assert [os.path.dirname(f["filename"]) for f in default.cache_files] == [os.path.join(train, "shards")]
    assert os.path.basename(default.cache_files[0]["filename"]).startswith("cache-")
    cache = str(tmp_path / "scores.arrow")
    on_disk = compute_influence(train, tasks, batch_size=7, cache_file_name=cache)
    assert os.path.isfile(cache) and on_disk.cache_files[0]["filename"] == cache
    assert default.to_dict() == on_disk.to_dict()
    assert json.loads(on_disk.info.description)["influence"]["pool_rows"] == 50
    # The store still lists only its own shards.
    assert len(load_gradients(train)) == 50


# ---- selection: exact against brute force on small tables full of ties ----


def brute_ranks(col):
    n = len(col)
    if n == 1:
        return [Fraction(1, 2)]
    return [Fraction(2 * sum(v < x for v in col) + sum(v == x for v in col) - 1, 2 * (n - 1)) for x in col]


def brute_select(mat, index, n_keep, method, pct, task_col=None, floor=0.0):
    n, k = mat.shape
    rows = range(n)
    # Per-task floors: floor(floor * n_keep / k) rows per task, tasks taking turns, each its best untaken row
    # (score descending, then index ascending).
    floors = []
    for _ in range(math.floor(floor * n_keep / k)):
        for j in range(k):
            floors.append(min((z for z in rows if z not in floors), key=lambda z: (-mat[z, j], index[z])))
    ranks = [brute_ranks(list(mat[:, j])) for j in range(k)]
    mean_rank = [sum(ranks[j][z] for j in range(k)) / k for z in rows]
    votes = [0] * n
    if method == "vote":
        thresholds = np.percentile(mat, pct, axis=0)  # the documented definition of tau_k
        votes = [sum(int(mat[z, j] > thresholds[j]) for j in range(k)) for z in rows]
        key = lambda z: (-votes[z], -mean_rank[z], index[z])  # noqa: E731
    elif method == "rank":
        key = lambda z: (-mean_rank[z], index[z])  # noqa: E731
    elif method == "mean":
        key = lambda z: (-Fraction(sum(Fraction(float(v)) for v in mat[z])) / k, index[z])  # noqa: E731
    elif method == "max":
        key = lambda z: (-max(mat[z]), index[z])  # noqa: E731
    else:  # task
        key = lambda z: (-mat[z, task_col], index[z])  # noqa: E731
    chosen = floors + sorted((z for z in rows if z not in floors), key=key)[: n_keep - len(floors)]
    selected = [z in set(chosen) for z in rows]
    return selected, votes, [float(r) for r in mean_rank]


@pytest.mark.parametrize("seed", range(3))
def test_selection_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 8, 21, 40):
        k = int(rng.integers(1, 5))
        # Small integers: many ties within a task and many rows with equal votes and equal rank sums.
        mat = rng.integers(0, 4, size=(n, k)).astype(np.float64)
        if seed % 2:
            mat[:, 0] = rng.normal(size=n)  # one continuous task among tied ones
        index = rng.permutation(3 * n)[:n]  # row order is not index order
        table = Dataset.from_dict(
            {"index": index.tolist(), **{f"influence_t{j}": mat[:, j].tolist() for j in range(k)}}
        )
        # vote with no floor is the paper's rule; vote with the default floor (1.0) and with half of it.
        for method, floor in (("vote", 0.0), ("vote", None), ("vote", 0.5), ("rank", None), ("mean", None),
                              ("max", None), ("task", None)):
            expected_floor = (1.0 if method == "vote" else 0.0) if floor is None else floor
            for fraction in rng.choice([0.1, 0.25, 0.5, 0.8, 1.0], size=2, replace=False).tolist():
                pct = float(rng.choice([0, 20, 50, 80, 95, 100]))
                n_keep = math.floor(fraction * n)
                common = dict(threshold_percentile=pct, method=method, task="t0", task_floor=floor)
                if n_keep == 0:
                    with pytest.raises(ValueError, match="selects no row"):
                        select(table, fraction=fraction, **common)
                    n_keep = int(rng.integers(0, n + 1))
                    out = select(table, num_rows=n_keep, **common)
                else:
                    out = select(table, fraction=fraction, **common)
                selected, votes, mean_rank = brute_select(mat, index, n_keep, method, pct, task_col=0,
                                                          floor=expected_floor)
                where = f"n={n} k={k} method={method} floor={floor} fraction={fraction} pct={pct}"
                assert out["selected"] == selected, where
                if method == "vote":
                    assert out["votes"] == votes, where
                    np.testing.assert_allclose(out["tiebreak"], mean_rank, rtol=1e-6, err_msg=where)
                if method == "rank":
                    np.testing.assert_allclose(out["consensus"], mean_rank, rtol=1e-6, err_msg=where)


def test_percentile_ranks_match_counting():
    rng = np.random.default_rng(9)
    for n in (1, 2, 5, 50):
        values = rng.integers(0, 5, size=n).astype(np.float64)
        assert percentile_ranks(values).tolist() == [float(r) for r in brute_ranks(list(values))]
    assert percentile_ranks(np.array([0.0, -0.0, 1.0])).tolist() == [0.25, 0.25, 1.0]
    # float32 columns take a packed-key sort; float64 ones that float32 cannot hold take an argsort. Both against
    # counting, with ties, signed zeros, infinities and values of both signs.
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38])
    for dtype in (np.float32, np.float64):
        values = np.concatenate([np.round(rng.normal(size=3000), 1), special]).astype(dtype)
        if dtype == np.float64:
            values[:10] += 1e-12  # not representable in float32
        less = (values[None, :] < values[:, None]).sum(axis=1)
        equal = (values[None, :] == values[:, None]).sum(axis=1)
        np.testing.assert_array_equal(percentile_ranks(values), (2 * less + equal - 1) / (2.0 * (len(values) - 1)))
    assert percentile_ranks(np.zeros(0)).tolist() == []


def test_norm_and_random_selection_match_brute_force():
    rng = np.random.default_rng(4)
    n, k = 30, 3
    mat = rng.normal(size=(n, k))
    table = Dataset.from_dict({"index": list(range(n)), **{f"influence_t{j}": mat[:, j].tolist() for j in range(k)}})
    out = select(table, fraction=0.3, method="norm")
    z = [[(mat[r, j] - mat[:, j].mean()) / mat[:, j].std() for j in range(k)] for r in range(n)]
    expected = sorted(range(n), key=lambda r: (-sum(z[r]) / k, r))[:9]
    assert [i for i, s in enumerate(out["selected"]) if s] == sorted(expected)
    a, b = select(table, fraction=0.3, method="random", seed=5), select(table, fraction=0.3, method="random", seed=5)
    assert a["selected"] == b["selected"] and sum(a["selected"]) == 9
    assert select(table, fraction=0.3, method="random", seed=6)["selected"] != a["selected"]


@pytest.mark.parametrize("dtype,width", [("float16", 2), ("float32", 4)])
def test_storage_bytes_per_row_and_float32_norms(tmp_path, dtype, width):
    import pyarrow as pa

    rng = np.random.default_rng(5)
    feats = rng.normal(size=(1000, 256)).astype(np.float32) * 3
    path = write_store(tmp_path / dtype, feats, shard_size=500, dtype=dtype)
    meta = json.load(open(os.path.join(path, "store.json")))
    assert meta["dtype"] == dtype and meta["bytes_per_row"] == 256 * width + 8 + 4  # features + int64 index + fp32 norm
    on_disk = sum(os.path.getsize(os.path.join(path, "shards", f)) for f in os.listdir(os.path.join(path, "shards")))
    assert meta["bytes_per_row"] <= on_disk / 1000 < meta["bytes_per_row"] * 1.02  # Arrow framing is small
    store = load_gradients(path)
    schema = store.data.schema
    assert schema.field("norm").type == pa.float32()
    assert schema.field("features").type == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 256)
    # Norms are those of the features before storage rounding, kept in float32.
    expected = np.linalg.norm(feats.astype(np.float64), axis=1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(store.with_format("numpy")[:]["norm"]), expected)
