"""Selection time over a large score table (default: 7M rows x 10 tasks, the size of a multi-million-row pool).

Builds a synthetic score table in memory (``index`` + one float32 ``influence_<task>`` column per task; scores are
rounded to a few significant digits so that ties occur, as they do in real float32 scores at this size) and
times ``icons_hf.select`` for each requested method, reporting the best of ``--repeats`` runs and, for reference in
the same run, the time of one ``np.argsort`` over the whole score matrix (the floor that any ranking pays).

    python benchmarks/selection.py                          # 7M x 10, vote (default per-task floor, and none)
    python benchmarks/selection.py --methods vote rank mean --rows 1000000

(Not named select.py: run as a script, a file of that name in the script's folder would shadow the standard
library's ``select`` module, which ``subprocess`` imports.)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np


def score_table(rows: int, tasks: int, seed: int, digits: int):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    rng = np.random.default_rng(seed)
    columns = {"index": pa.array(np.arange(rows, dtype=np.int64))}
    for k in range(tasks):
        values = rng.standard_normal(rows, dtype=np.float32) * 0.01
        columns[f"influence_task{k}"] = pa.array(np.round(values, digits).astype(np.float32))
    return Dataset(InMemoryTable(pa.table(columns)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=7_000_000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["vote"])
    parser.add_argument("--task-floors", nargs="+", default=["default", "0"],
                        help="task_floor values to time for each method ('default': select()'s own)")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--digits", type=int, default=6, help="decimal digits kept in the synthetic scores (ties)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from datasets.utils.logging import disable_progress_bar

    from icons_hf import select

    disable_progress_bar()
    start = time.perf_counter()
    table = score_table(args.rows, args.tasks, seed=0, digits=args.digits)
    build = time.perf_counter() - start
    mat = np.stack([np.asarray(table.data.column(f"influence_task{k}")) for k in range(args.tasks)], axis=1)
    distinct = len(np.unique(mat[:, 0]))
    start = time.perf_counter()
    for k in range(args.tasks):
        np.argsort(mat[:, k])
    argsort_s = time.perf_counter() - start
    del mat
    print(f"# {args.rows:,} rows x {args.tasks} tasks (task0 has {distinct:,} distinct values), {os.cpu_count()} CPUs; "
          f"table built in {build:.1f} s; np.argsort of every task column: {argsort_s:.2f} s")
    for method in args.methods:
        for floor in args.task_floors:
            task_floor = None if floor == "default" else float(floor)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = select(table, fraction=args.fraction, method=method, task="task0" if method == "task" else None,
                             task_floor=task_floor)
                times.append(time.perf_counter() - start)
            n_sel = int(np.asarray(out.data.column("selected")).sum())
            print(f"select(method={method!r}, fraction={args.fraction}, task_floor={floor}): "
                  f"best {min(times):.2f} s of {[round(t, 2) for t in times]}; {n_sel:,} selected; "
                  f"{min(times) / argsort_s:.1f}x the argsort floor")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
