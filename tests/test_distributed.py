"""Several processes, one store: extraction and the Trainer callback under accelerate launch / torchrun (CPU, gloo).

Each job runs a small script (written to the test's folder) in fresh processes. The single-process references run
with one intra-op thread, as the launched processes do (``OMP_NUM_THREADS=1``): CPU kernels may sum in another
order with more threads, and bit-for-bit comparisons are about the number of processes, not of threads.
"""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

try:
    from .worker_source import TINY_LLAMA
except ImportError:  # tests/ is not a package
    from worker_source import TINY_LLAMA

WORKER = r'''
import json, logging, os, sys
''' + TINY_LLAMA + r'''

def extract(out):
    from icons_hf import compute_gradients

    # No process group is set up here: compute_gradients joins the one the launcher describes.
    compute_gradients(build_model(0), Dataset.from_list(with_record_hashes(build_rows(37, 1))), output_dir=out, dim=256,
                      shard_size=5,
                      batch_size=3, show_progress=False)


def train(out):
    from transformers import Trainer, TrainingArguments

    from icons_hf import IconsCallback
    from icons_hf.data import IconsCollator

    pool = Dataset.from_list(build_rows(23, 4))
    tasks = {"t1": Dataset.from_list(build_rows(9, 5)), "t2": Dataset.from_list(build_rows(6, 6))}
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
        learning_rate=1e-2, report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0,
        logging_steps=1,
    )
    callback = IconsCallback(pool, tasks, os.path.join(out, "icons"), dim=128, batch_size=3, shard_size=4,
                             train_feature="adam")
    trainer = Trainer(model=build_model(0), args=args, train_dataset=Dataset.from_list(build_rows(16, 3)),
                      data_collator=IconsCollator(0), callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"callback-{rank}.json"), "w") as handle:
        json.dump({"checkpoints": callback.checkpoints, "world": int(os.environ.get("WORLD_SIZE", "1"))}, handle)


def offline(out, ckpt):
    from peft import PeftModel

    from icons_hf import compute_checkpoint_stores

    # The callback's settings; name, learning rate and optimizer.pt come from the checkpoint folder.
    model = PeftModel.from_pretrained(build_base(0), ckpt, is_trainable=True)
    tasks = {"t1": Dataset.from_list(build_rows(9, 5)), "t2": Dataset.from_list(build_rows(6, 6))}
    compute_checkpoint_stores(model, Dataset.from_list(build_rows(23, 4)), tasks, out, checkpoint=ckpt,
                              settings=dict(dim=128, batch_size=3, shard_size=4, train_feature="adam"),
                              show_progress=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mode = sys.argv[1]
    {"extract": extract, "train": train, "offline": offline}[mode](*sys.argv[2:])
'''


@contextlib.contextmanager
def _helpers():
    """The worker's functions, run in this process with one intra-op thread (as each launched process has)."""
    import torch

    namespace = {"__name__": "icons_worker"}
    exec(compile(WORKER, "worker.py", "exec"), namespace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield namespace
    finally:
        torch.set_num_threads(threads)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


def _accelerate(script, *args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), script,
            *args]


def _torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(root):
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def test_two_processes_write_the_single_process_store_bit_for_bit(tmp_path):
    from icons_hf import load_gradients
    from icons_hf.store import read_record_hashes

    worker = _worker(tmp_path)
    with _helpers() as helpers:
        helpers["extract"](str(tmp_path / "one"))
    log = _run(_accelerate(worker, "extract", str(tmp_path / "two")))
    # 37 rows in shards of 5 = 8 shards; each process computed its own half.
    assert "Process 0 of 2: 4 shard(s) to compute" in log, log[-3000:]
    assert "Process 1 of 2: 4 shard(s) to compute" in log, log[-3000:]
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert sorted(one) == sorted(two) and len([p for p in one if p.endswith(".arrow")]) == 8
    for rel in sorted(one):
        assert one[rel] == two[rel], f"{rel} differs between the 1-process and the 2-process run"
    store = load_gradients(tmp_path / "two")
    np.testing.assert_array_equal(store["index"], np.arange(37))
    # The rows' source-record hashes are kept by index whichever process computed them.
    with _helpers() as helpers:
        rows = helpers["with_record_hashes"](helpers["build_rows"](37, 1))
    assert store["record_hash"] == [r["record_hash"] for r in rows]
    assert read_record_hashes(tmp_path / "two") == {i: r["record_hash"] for i, r in enumerate(rows)}
    assert json.loads(two["store.json"])["complete"] is True


def test_trainer_callback_under_ddp_covers_every_row_once_and_matches_offline_extraction(tmp_path):
    from icons_hf import compute_influence, load_gradients, load_run, select

    worker = _worker(tmp_path)
    log = _run(_torchrun(worker, "train", str(tmp_path)))
    runs = [json.load(open(tmp_path / f"callback-{rank}.json")) for rank in (0, 1)]
    assert runs[0]["world"] == 2 and runs[0]["checkpoints"] == runs[1]["checkpoints"]
    # 23 pool rows in shards of 4 = 6 shards, 3 per process.
    assert "Process 1 of 2: 3 shard(s) to compute" in log and "Process 0 of 2: 3 shard(s) to compute" in log
    train, tasks = load_run(tmp_path / "icons")
    assert len(train) == 1 and set(tasks) == {"t1", "t2"}
    for path, n in ((train[0], 23), (tasks["t1"][0], 9), (tasks["t2"][0], 6)):
        np.testing.assert_array_equal(load_gradients(path)["index"], np.arange(n))  # every row once, in order
    meta = json.load(open(os.path.join(train[0], "store.json")))
    assert meta["complete"] and meta["num_features"] == 23 and meta["checkpoint"] == "checkpoint-2"

    # The same checkpoint extracted afterwards by one process (the same function, from the checkpoint folder)
    # gives the same stores, bit for bit, and the same run entry.
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    with _helpers() as helpers:
        helpers["offline"](str(tmp_path / "offline"), ckpt)
    for live, name in ((train[0], "train"), (tasks["t1"][0], "t1"), (tasks["t2"][0], "t2")):
        a, b = _tree(live), _tree(tmp_path / "offline" / "checkpoint-2" / name)
        assert sorted(a) == sorted(b)
        for rel in sorted(a):
            assert a[rel] == b[rel], f"{name}/{rel} differs between the DDP callback and offline extraction"
    entries = [json.load(open(tmp_path / d / "icons_run.json"))["checkpoints"] for d in ("icons", "offline")]
    keys = ("checkpoint", "step", "learning_rate")
    assert [{k: e[k] for k in keys} for e in entries[0]] == [{k: e[k] for k in keys} for e in entries[1]]
    scores = select(compute_influence(train, tasks), fraction=0.5)
    assert sum(scores["selected"]) == 11 and scores["index"] == list(range(23))
