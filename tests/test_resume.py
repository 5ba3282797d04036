"""Resumable gradient stores: a run killed with SIGKILL and started again ends with the uninterrupted run's store,
computing only the missing shards; stores written with other settings are refused with the difference named."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from datasets import Dataset

from icons_hf import compute_gradients, load_gradients
from icons_hf.store import read_record_hashes

try:
    from .worker_source import TINY_LLAMA
except ImportError:  # tests/ is not a package
    from worker_source import TINY_LLAMA

WORKER = r'''
import sys, time

from icons_hf import compute_gradients
''' + TINY_LLAMA + r'''

CALL = dict(dim=256, shard_size=4, batch_size=2, show_progress=False)


if __name__ == "__main__":
    model = build_model(0)
    # Slow the forward pass down (without changing any number) so the run is still going when it is killed.
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.25))
    compute_gradients(model, Dataset.from_list(with_record_hashes(build_rows(30, 1))), output_dir=sys.argv[1], **CALL)
'''


@pytest.fixture
def worker(tmp_path):
    namespace = {"__name__": "icons_worker"}
    exec(compile(WORKER, "worker.py", "exec"), namespace)
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    namespace["path"] = str(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): CPU kernels may sum differently with more
    try:
        yield namespace
    finally:
        torch.set_num_threads(threads)


def _same_call(worker, output_dir):
    rows = worker["with_record_hashes"](worker["build_rows"](30, 1))
    return compute_gradients(worker["build_model"](0), Dataset.from_list(rows), output_dir=output_dir, **worker["CALL"])


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                out[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return out


def _shards(store):
    folder = os.path.join(store, "shards")
    return {n: os.stat(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".arrow")}


def test_sigkill_then_rerun_equals_uninterrupted_run_and_computes_only_missing_shards(tmp_path, worker, caplog):
    store = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, worker["path"], store], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (os.path.isdir(os.path.join(store, "shards")) and _shards(store)):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    before = _shards(store)
    total = 8  # 30 rows in shards of 4
    assert 1 <= len(before) < total, sorted(before)
    meta = json.load(open(os.path.join(store, "store.json")))
    assert meta["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        load_gradients(store)
    # A shard that a dying process was writing: garbage under the temporary name, never read, removed on resume.
    names = (f"rows-{s:010d}-{min(s + 4, 30):010d}.arrow" for s in range(0, 30, 4))
    missing = next(n for n in names if n not in before)
    partial = os.path.join(store, "shards", f"{missing}.tmp-4242")
    with open(partial, "wb") as handle:
        handle.write(b"\xff" * 100)

    with caplog.at_level(logging.INFO, logger="icons_hf"):
        assert _same_call(worker, store) == store
    assert f"Resuming {store}: {len(before)} of {total} shards already written." in caplog.text
    assert f"Process 0 of 1: {total - len(before)} shard(s) to compute" in caplog.text
    assert not os.path.exists(partial) and f"Removing {os.path.basename(partial)}" in caplog.text
    after = _shards(store)
    assert len(after) == total
    for name, stat in before.items():  # the shards written before the kill were left alone
        assert (after[name].st_ino, after[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name

    reference = _same_call(worker, str(tmp_path / "uninterrupted"))
    a, b = _tree(store), _tree(reference)
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs from the uninterrupted run"
    np.testing.assert_array_equal(load_gradients(store)["index"], np.arange(30))
    # Each row's source-record hash is kept by index, across the kill and the resumption.
    expected = {i: r["record_hash"] for i, r in enumerate(worker["with_record_hashes"](worker["build_rows"](30, 1)))}
    assert read_record_hashes(store) == expected
    assert json.load(open(os.path.join(store, "store.json")))["record_hash"] is True

    # Calling again on a complete store computes nothing and changes nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="icons_hf"):
        _same_call(worker, store)
    assert "Process 0 of 1: 0 shard(s) to compute" in caplog.text
    assert _tree(store) == a


def test_store_written_with_other_settings_is_refused_naming_the_difference(tmp_path, worker):
    from icons_hf.gradients.capture import LinearCapture

    store = str(tmp_path / "store")
    rows = Dataset.from_list(worker["build_rows"](6, 1))
    call = dict(dim=64, shard_size=4, batch_size=3, show_progress=False)
    compute_gradients(worker["build_model"](0), rows, output_dir=store, **call)
    written = _tree(store)

    model = worker["build_model"](0)
    names = LinearCapture(model).parameter_names
    params = dict(model.named_parameters())
    moments = {n: {"exp_avg": torch.zeros_like(params[n]), "exp_avg_sq": torch.ones_like(params[n])} for n in names}
    cases = [
        (dict(model=worker["build_model"](1)), r"weights \(model weights\): stored"),
        (dict(projection="rademacher"), r'projection\.kind: stored "countsketch", requested "rademacher"'),
        (dict(dim=32), r"projection\.dim: stored 64, requested 32"),
        (dict(seed=3), r"projection\.seed: stored 0, requested 3"),
        (dict(feature="adam", optimizer_state=moments), r'preconditioner\.feature: stored "sgd", requested "adam"'),
        (dict(dtype="float32"), r"dtype: stored float16, requested float32"),
        (dict(dataset=Dataset.from_list(worker["build_rows"](6, 2))), r"rows \(dataset rows\): stored"),
        (dict(shard_size=2), r"shard_size: stored 4, requested 2"),
        (dict(max_length=10), r"max_length: stored null, requested 10"),
        (dict(dataset=Dataset.from_list(worker["with_record_hashes"](worker["build_rows"](6, 1)))),
         r"record_hash: stored False, requested True"),
    ]
    for change, message in cases:
        kwargs = dict(call, model=model, dataset=rows)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message) as err:
            compute_gradients(kwargs.pop("model"), kwargs.pop("dataset"), output_dir=store, **kwargs)
        assert "Use another output_dir, or delete the folder" in str(err.value)
        assert _tree(store) == written, f"refusing {change} changed the store"

    # Settings that do not change the features (batching, padding id) may differ on a rerun: it resumes.
    assert compute_gradients(model, rows, output_dir=store, **dict(call, batch_size=1, pad_token_id=5)) == store
    assert {k: v for k, v in _tree(store).items() if k.endswith(".arrow")} == {
        k: v for k, v in written.items() if k.endswith(".arrow")}
    assert json.load(open(os.path.join(store, "store.json")))["settings"]["batch_size"] == 1  # the latest call's


def test_changed_record_hashes_are_refused_on_resume(tmp_path, worker):
    rows = worker["build_rows"](6, 1)
    call = dict(dim=16, shard_size=4, show_progress=False)
    store = compute_gradients(worker["build_model"](0), Dataset.from_list(worker["with_record_hashes"](rows)),
                              output_dir=tmp_path / "s", **call)
    other = Dataset.from_list(worker["with_record_hashes"](rows, salt="x"))
    with pytest.raises(ValueError, match=r"record_hashes: stored"):
        compute_gradients(worker["build_model"](0), other, output_dir=store, **call)
