"""Influence throughput and peak memory over a large train store, against a bare NumPy matmul in the same run.

Writes a synthetic train store (``rows x dim`` float16 features, shards of 4096 rows) and ``tasks`` validation
stores directly with ``StoreWriter``, then measures, each in a fresh child process so that peak RSS belongs to
the measurement alone:

* ``numpy``: the bare reference: every shard's feature block opened with ``np.memmap`` and multiplied by the
  ``dim x tasks`` matrix of mean validation vectors (float32), shard by shard; for the balanced specialists by the
  ``dim x (tasks x val_rows)`` matrix of every validation example's unit vector (the product they need);
* ``stream``: the streaming path that scoring used before it became a ``Dataset.map`` (``streaming_baseline.py``:
  ``iter_store_batches`` batch by batch, the balanced specialists' cosines through a temporary column file);
* ``icons``: ``icons_hf.compute_influence(train, tasks, specialist=...)`` for each ``--specialist`` (the
  ``Dataset.map`` path), computing from scratch (its cache file is removed before every run);
* ``cached``: the same call again, unchanged: served from the cache file the previous ``icons`` run wrote.

Each is run ``--repeats`` times, alternating, and the best time is kept (the store is in the page cache after the
first pass). The ratio that matters is ``icons / stream`` (target: at most 1.25), in wall time and in process CPU
time (on a shared machine wall time swings between identical runs, CPU time far less).
Peak RSS is the child's high-water mark (``VmHWM``); ``import RSS`` is the child's RSS right after importing its libraries.

    python benchmarks/influence.py                      # 100K rows x 8192 x 10 tasks (1.6 GB on disk)
    python benchmarks/influence.py --large              # and 1M rows (16 GB on disk; checks free space first)
    python benchmarks/influence.py --rows 20000         # a quick run
    python benchmarks/influence.py --specialist balanced --val-rows 50   # the default specialist alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GiB = 1024**3
KINDS = ("numpy", "stream", "icons", "cached")
SHARD = 4096


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def _rss_now_kib() -> int:
    return _status_kib("VmRSS")


def _config(dim: int) -> dict:
    return {"projection": {"kind": "countsketch", "dim": dim, "seed": 0}, "parameters": {"w": [dim]},
            "model_config": "bench", "weights": "bench", "preconditioner": {"feature": "sgd"}}


def write_store(path: str, rows: int, dim: int, seed: int) -> float:
    from icons_hf.store import StoreWriter

    start = time.perf_counter()
    writer = StoreWriter(path, config=_config(dim), num_rows=rows, shard_size=SHARD, dim=dim, dtype="float16")
    rng = np.random.default_rng(seed)
    for lo, hi in writer.open():
        feats = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        writer.write_shard(lo, hi, np.arange(lo, hi), feats)
    writer.finalize()
    return time.perf_counter() - start


def _feature_blocks(path: str):
    """(file, byte offset, rows) of the float16 feature block of each shard (one record batch per shard)."""
    import pyarrow as pa

    blocks = []
    shard_dir = os.path.join(path, "shards")
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".arrow"):
            continue
        file = os.path.join(shard_dir, name)
        with pa.memory_map(file) as source:
            buf = source.read_buffer()  # zero-copy view of the whole file
            batches = list(pa.ipc.open_stream(buf))
            if len(batches) != 1:
                raise ValueError(f"{file}: expected one record batch, found {len(batches)}")
            values = batches[0].column("features").flatten()
            offset = values.buffers()[1].address - buf.address + values.offset * values.type.byte_width
            blocks.append((file, offset, len(batches[0])))
            del buf, batches, values
    return blocks


def child_numpy(train: str, means: np.ndarray) -> dict:
    dim = means.shape[0]
    blocks = _feature_blocks(train)
    import_rss = _rss_now_kib()
    start = time.perf_counter()
    rows, checksum = 0, 0.0
    for file, offset, n in blocks:
        block = np.memmap(file, dtype=np.float16, mode="r", offset=offset, shape=(n, dim))
        out = block.astype(np.float32) @ means
        checksum += float(out[:, 0].sum())
        rows += n
        del block
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "checksum": checksum, "import_rss_kib": import_rss}


def child_icons(train: str, tasks: dict, specialist: str, kind: str) -> dict:
    from datasets.utils.logging import disable_progress_bar

    from icons_hf import compute_influence

    disable_progress_bar()
    cache = os.path.join(os.path.dirname(train), f"scores-{specialist}.arrow")
    if kind == "icons":
        for name in (cache, f"{cache}.icons.json"):
            if os.path.exists(name):
                os.remove(name)
    import_rss = _rss_now_kib()
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "stream":
        from streaming_baseline import stream_influence

        scores = stream_influence(train, tasks, specialist=specialist, work_dir=os.path.dirname(train))
    else:
        scores = compute_influence(train, tasks, specialist=specialist, work_dir=os.path.dirname(train),
                                   cache_file_name=cache)
    first = scores.data.column(f"influence_{next(iter(tasks))}").to_numpy()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": len(scores), "checksum": float(first.sum()),
            "import_rss_kib": import_rss}


def validation_matrix(tasks: dict, specialist: str) -> np.ndarray:
    """What influence multiplies by: dim x tasks mean unit validation vectors (``mean``), or dim x examples unit
    vectors of every validation example (``balanced``/``zscore``); float32."""
    from icons_hf.store import load_gradients

    cols = []
    for path in tasks.values():
        store = load_gradients(path).with_format("numpy", dtype=np.float64)[:]
        unit = store["features"] / store["norm"][:, None]
        cols += [unit.mean(axis=0)] if specialist == "mean" else list(unit)
    return np.stack(cols, axis=1).astype(np.float32)


def run_child(kind: str, train: str, tasks: dict, specialist: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--train", train, "--tasks-json", json.dumps(tasks),
           "--specialist", specialist]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(rows: int, args, workdir: str) -> dict:
    need = rows * (args.dim * 2 + 12) * 1.05 + args.tasks * args.val_rows * (args.dim * 2 + 12)
    free = shutil.disk_usage(workdir).free
    if need > free * 0.9:
        return {"rows": rows, "skipped": f"needs {need / GiB:.1f} GiB on disk, {free / GiB:.1f} GiB free in {workdir}"}
    root = tempfile.mkdtemp(prefix=f"influence-{rows}-", dir=workdir)
    try:
        train = os.path.join(root, "train")
        write_s = write_store(train, rows, args.dim, seed=0)
        tasks = {}
        for k in range(args.tasks):
            tasks[f"task{k}"] = os.path.join(root, f"task{k}")
            write_store(tasks[f"task{k}"], args.val_rows, args.dim, seed=100 + k)
        out = {
            "rows": rows,
            "dim": args.dim,
            "tasks": args.tasks,
            "val_rows": args.val_rows,
            "store_gib": sum(os.path.getsize(os.path.join(train, "shards", f)) for f in os.listdir(os.path.join(train, "shards"))) / GiB,
            "write_seconds": write_s,
            "specialists": {},
        }
        for specialist in args.specialist:
            results = {kind: [] for kind in KINDS}
            for _ in range(args.repeats):
                for kind in KINDS:
                    results[kind].append(run_child(kind, train, tasks, specialist))
            best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
            peak = {k: max(r["peak_rss_kib"] for r in v) for k, v in results.items()}
            entry = {}
            for kind in KINDS:
                entry[f"{kind}_seconds"] = best[kind]["seconds"]
                entry[f"{kind}_rows_per_s"] = rows / best[kind]["seconds"]
                entry[f"{kind}_peak_rss_gib"] = peak[kind] / 1024**2
                entry[f"{kind}_import_rss_gib"] = best[kind]["import_rss_kib"] / 1024**2
            entry["icons_over_numpy_time"] = best["icons"]["seconds"] / best["numpy"]["seconds"]
            entry["icons_over_stream_time"] = best["icons"]["seconds"] / best["stream"]["seconds"]
            cpu = {k: min(r["cpu_seconds"] for r in results[k]) for k in ("stream", "icons")}
            entry["icons_over_stream_cpu"] = cpu["icons"] / cpu["stream"]
            entry["cpu_seconds"] = cpu
            entry["same_scores"] = best["icons"]["checksum"] == best["stream"]["checksum"]
            entry["all_seconds"] = {k: [round(r["seconds"], 2) for r in v] for k, v in results.items()}
            out["specialists"][specialist] = entry
        return out
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000], help="train rows per measured size")
    parser.add_argument("--large", action="store_true", help="also measure 1,000,000 rows (16 GB on disk at dim 8192)")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--val-rows", type=int, default=64, help="validation rows per task")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the synthetic stores go (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    parser.add_argument("--specialist", nargs="+", default=["mean", "balanced"],
                        choices=["mean", "balanced", "zscore"], help="compute_influence specialists to measure")
    parser.add_argument("--child", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--tasks-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        tasks = json.loads(args.tasks_json)
        specialist = args.specialist[0]
        if args.child == "numpy":
            result = child_numpy(args.train, validation_matrix(tasks, specialist))
        else:
            result = child_icons(args.train, tasks, specialist, args.child)
        # VmHWM: this process's own peak (ru_maxrss would include the parent's size at fork time).
        result["peak_rss_kib"] = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return 0

    workdir = args.workdir or tempfile.gettempdir()
    sizes = list(args.rows) + ([1_000_000] if args.large else [])
    print(f"# dim {args.dim}, {args.tasks} tasks x {args.val_rows} validation rows, float16 store, shards of {SHARD}; "
          f"{os.cpu_count()} CPUs; workdir {workdir} ({shutil.disk_usage(workdir).free / GiB:.0f} GiB free)")
    for rows in sizes:
        result = bench_size(rows, args, workdir)
        if "skipped" in result:
            print(f"rows={rows}: skipped: {result['skipped']}")
            continue
        print(f"rows={rows:,} store={result['store_gib']:.2f} GiB (written in {result['write_seconds']:.0f} s)")
        for specialist, r in result["specialists"].items():
            print(
                f"  specialist={specialist}\n"
                f"    numpy memmap matmul : {r['numpy_rows_per_s']:>10,.0f} rows/s  {r['numpy_seconds']:7.2f} s  "
                f"peak RSS {r['numpy_peak_rss_gib']:.2f} GiB (after imports {r['numpy_import_rss_gib']:.2f})\n"
                f"    streaming (before)  : {r['stream_rows_per_s']:>10,.0f} rows/s  {r['stream_seconds']:7.2f} s  "
                f"peak RSS {r['stream_peak_rss_gib']:.2f} GiB (after imports {r['stream_import_rss_gib']:.2f})\n"
                f"    compute_influence   : {r['icons_rows_per_s']:>10,.0f} rows/s  {r['icons_seconds']:7.2f} s  "
                f"peak RSS {r['icons_peak_rss_gib']:.2f} GiB (after imports {r['icons_import_rss_gib']:.2f})\n"
                f"    cached rerun        : {r['cached_rows_per_s']:>10,.0f} rows/s  {r['cached_seconds']:7.2f} s\n"
                f"    CPU time (best) stream {r['cpu_seconds']['stream']:.2f} s, icons {r['cpu_seconds']['icons']:.2f} s: "
                f"ratio icons/stream {r['icons_over_stream_cpu']:.2f}\n"
                f"    time ratio icons/stream: {r['icons_over_stream_time']:.2f}  icons/numpy: "
                f"{r['icons_over_numpy_time']:.2f}  same scores: {r['same_scores']}   all runs (s): {r['all_seconds']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
