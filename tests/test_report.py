"""Selection reports: files, figures and every reported number against brute-force recomputation."""

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from datasets import Dataset  # noqa: E402

from icons_hf import export_selection, select  # noqa: E402
from icons_hf.provenance import provenance  # noqa: E402
from icons_hf.report import FIGURES, write_report  # noqa: E402

FOLDERS = ["coco", "gqa", "ocr_vqa", "textvqa", "vg", None]
TASKS = ["vqav2", "gqa", "textvqa"]


def llava_pool(path, n, rng):
    records = []
    for i in range(n):
        folder = FOLDERS[rng.integers(len(FOLDERS))]
        record = {
            "id": f"row-{i % (n // 2)}",  # repeated ids, as in LLaVA-665K
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}],
        }
        if folder:
            record["image"] = f"{folder}/{i:06d}.jpg"
        records.append(record)
    with open(path, "w") as handle:
        json.dump(records, handle)
    return records


def score_table(n, tasks, rng, decimals=3):
    shared = rng.normal(size=n)
    cols = {"index": np.arange(n)}
    for k, task in enumerate(tasks):
        # Rounded so that equal scores (ties at and around the thresholds) occur.
        cols[f"influence_{task}"] = np.round((0.3 * (k + 1) * shared + rng.normal(size=n)) * 0.01, decimals).astype(
            np.float32
        )
    return Dataset.from_dict(cols)


def brute_threshold(values, percentile):
    """Linear-interpolation percentile, written out."""
    ordered = sorted(float(v) for v in values)
    pos = percentile / 100 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def md_table(markdown, heading):
    """Rows (lists of cells) of the first table after a '## heading' line."""
    section = markdown.split(f"## {heading}\n", 1)[1]
    rows = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    return rows[0], rows[2:]


def brute_force(scores_rows, tasks, selected_positions, percentile=80.0):
    n = len(scores_rows["index"])
    values = {t: [float(v) for v in scores_rows[f"influence_{t}"]] for t in tasks}
    tau = {t: brute_threshold(values[t], percentile) for t in tasks}
    top = {t: {scores_rows["index"][i] for i in range(n) if values[t][i] > tau[t]} for t in tasks}
    chosen = set(selected_positions)
    votes = {scores_rows["index"][i]: sum(values[t][i] > tau[t] for t in tasks) for i in range(n)}
    hist = {}
    for v in range(len(tasks) + 1):
        rows = [r for r, c in votes.items() if c == v]
        hist[v] = (len(rows), sum(r in chosen for r in rows))
    pair = {a: {b: len(top[a] & top[b]) / len(top[a]) for b in tasks} for a in tasks}
    k = len(chosen)
    own = {}
    for t in tasks:
        ranked = sorted(range(n), key=lambda i: (-values[t][i], scores_rows["index"][i]))[:k]
        own[t] = sum(scores_rows["index"][i] in chosen for i in ranked) / k
    above = {t: len(top[t] & chosen) / len(top[t]) for t in tasks}
    return tau, hist, pair, own, above


@pytest.fixture(scope="module")
def llava_export(tmp_path_factory):
    rng = np.random.default_rng(1234)
    root = tmp_path_factory.mktemp("report")
    n = 300
    records = llava_pool(root / "pool.json", n, rng)
    scores = select(score_table(n, TASKS, rng), fraction=0.2)
    export_dir = export_selection(str(root / "pool.json"), scores, str(root / "export"))
    report = write_report(export_dir)
    return export_dir, report, records, scores


def test_report_files_and_figures(llava_export):
    from PIL import Image

    export_dir, report, _, _ = llava_export
    assert report == os.path.join(export_dir, "report", "report.md")
    markdown = open(report, encoding="utf-8").read()
    for name in FIGURES.values():
        path = os.path.join(export_dir, "report", name)
        assert os.path.isfile(path), name
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 250
            # Not a blank canvas: a drawn figure has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
        assert f"]({name})" in markdown
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(referenced) == sorted(FIGURES.values())


def test_report_numbers_match_brute_force(llava_export):
    export_dir, report, records, scores = llava_export
    markdown = open(report, encoding="utf-8").read()
    with open(os.path.join(export_dir, "indices.json")) as handle:
        positions = json.load(handle)
    rows = scores.select_columns(["index", *(f"influence_{t}" for t in TASKS)])[:]
    tau, hist, pair, own, above = brute_force(rows, TASKS, positions)
    data = json.load(open(os.path.join(export_dir, "report", "report.json")))

    # Thresholds.
    for task in TASKS:
        assert data["thresholds"][task] == pytest.approx(tau[task], rel=1e-12, abs=1e-15)
    # Vote histogram, pool vs selected, exactly.
    header, table = md_table(markdown, "Votes")
    assert header == ["votes", "pool rows", "selected rows"]
    assert {int(r[0]): (int(r[1]), int(r[2])) for r in table} == hist
    assert sum(p for p, _ in hist.values()) == len(records)
    assert sum(s for _, s in hist.values()) == len(positions) == 60
    # Pairwise overlap of the top sets: the printed percentages and the exact values.
    header, table = md_table(markdown, "Overlap between the tasks' top sets")
    assert header[1:] == TASKS
    for row in table:
        for b, cell in zip(TASKS, row[1:], strict=True):
            assert cell == f"{100 * pair[row[0]][b]:.1f}%"
            assert data["pairwise_overlap"][row[0]][b] == pytest.approx(pair[row[0]][b], abs=1e-12)
    # Overlap of the subset with each task's own top rows.
    header, table = md_table(markdown, "Overlap of the subset with each task's own top rows")
    assert header == ["task", "top 60", "above threshold"]
    for task, top_k, above_cell in table:
        assert top_k == f"{100 * own[task]:.1f}%"
        assert above_cell == f"{100 * above[task]:.1f}%"
        assert data["subset_overlap_top_k"][task] == pytest.approx(own[task], abs=1e-12)
    # Composition by image folder (LLaVA default), counted from the records.
    header, table = md_table(markdown, "Composition")
    assert header[:4] == ["image folder", "pool rows", "pool share", "selected rows"]
    folder = [r["image"].split("/")[0] if "image" in r else "text-only" for r in records]
    got = {r[0]: (int(r[1]), int(r[3])) for r in table}
    expected = {f: (folder.count(f), sum(folder[p] == f for p in positions)) for f in set(folder)}
    assert got == expected


def test_report_custom_groups_output_dir_and_other_method(tmp_path):
    """A datasets pool, method 'mean' (no votes column: the report recomputes them), groups= as a sequence."""
    rng = np.random.default_rng(99)
    n = 120
    pool = Dataset.from_dict(
        {"text": [f"row {i}" for i in range(n)], "kind": [["a", "b", "c"][i % 3] for i in range(n)]}
    )
    scores = select(score_table(n, TASKS[:2], rng, decimals=4), fraction=0.25, method="mean")
    assert "votes" not in scores.column_names
    export_dir = export_selection(pool, scores, tmp_path / "export")
    groups = [f"g{(i * 7) % 4}" for i in range(n)]
    report = write_report(export_dir, tmp_path / "elsewhere", groups=groups)
    assert report == os.path.join(tmp_path / "elsewhere", "report.md")
    markdown = open(report, encoding="utf-8").read()
    positions = json.load(open(os.path.join(export_dir, "indices.json")))
    rows = scores.select_columns(["index", *(f"influence_{t}" for t in TASKS[:2])])[:]
    _, hist, _, _, _ = brute_force(rows, TASKS[:2], positions)
    _, table = md_table(markdown, "Votes")
    assert {int(r[0]): (int(r[1]), int(r[2])) for r in table} == hist
    _, table = md_table(markdown, "Composition")
    got = {r[0]: (int(r[1]), int(r[3])) for r in table}
    assert got == {g: (groups.count(g), sum(groups[p] == g for p in positions)) for g in set(groups)}
    # group_column on a datasets pool: the pool was in memory, so only the subset is reported.
    report = write_report(export_dir, tmp_path / "by-kind", group_column="kind")
    markdown = open(report, encoding="utf-8").read()
    header, table = md_table(markdown, "Composition")
    assert header == ["kind", "selected rows", "selected share"]
    kinds = pool["kind"]
    assert {r[0]: int(r[1]) for r in table} == {
        k: sum(kinds[p] == k for p in positions) for k in {kinds[p] for p in positions}
    }


def test_report_single_task_has_no_heatmap(tmp_path):
    rng = np.random.default_rng(5)
    llava_pool(tmp_path / "pool.jsonl.tmp", 50, rng)
    records = json.load(open(tmp_path / "pool.jsonl.tmp"))
    with open(tmp_path / "pool.jsonl", "w") as handle:
        handle.writelines(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n" for r in records)
    scores = select(score_table(50, ["only"], rng), fraction=0.2)
    export_dir = export_selection(str(tmp_path / "pool.jsonl"), scores, tmp_path / "export")
    report = write_report(export_dir)
    markdown = open(report, encoding="utf-8").read()
    assert not os.path.exists(os.path.join(export_dir, "report", FIGURES["heatmap"]))
    assert FIGURES["heatmap"] not in markdown
    assert "Only one target task" in markdown
    # Text-only records without a source field: no grouping to report, and the page says how to add one.
    assert FIGURES["composition"] not in markdown and "group_column=" in markdown


def test_report_errors(tmp_path, llava_export):
    export_dir, _, _, _ = llava_export
    with pytest.raises(FileNotFoundError, match="export_selection"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="either group_column= or groups="):
        write_report(export_dir, tmp_path / "r1", group_column="id", groups={})
    with pytest.raises(ValueError, match="no entry for pool row"):
        write_report(export_dir, tmp_path / "r2", groups={0: "x"})
    with pytest.raises(ValueError, match="record 0 has no 'source' field"):
        write_report(export_dir, tmp_path / "r3", group_column="source")
    # A folder whose indices.json disagrees with the score table.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(export_dir):
        if os.path.isfile(os.path.join(export_dir, name)):
            with open(os.path.join(export_dir, name), "rb") as src, open(broken / name, "wb") as dst:
                dst.write(src.read())
    positions = json.load(open(broken / "indices.json"))
    json.dump(positions[1:], open(broken / "indices.json", "w"))
    with pytest.raises(ValueError, match=r"indices\.json lists 59"):
        write_report(broken)


@pytest.mark.parametrize(
    "specialist, task_floor, label, floor_text",
    [
        (
            "balanced",
            None,
            "percentile rank (0-1)",
            "100% of the subset reserved in equal shares: each task's own top 20 rows",
        ),
        (
            "zscore",
            0.5,
            "mean z-score",
            "50% of the subset reserved in equal shares: each task's own top 10 rows",
        ),
        ("mean", 0.0, "mean cosine", "none (the subset is ranked by the method alone, the ICONS paper's rule)"),
        (None, 0.0, "mean cosine", "none (the subset is ranked by the method alone, the ICONS paper's rule)"),
    ],
)
def test_report_names_the_score_scale_and_the_floors(tmp_path, specialist, task_floor, label, floor_text):
    rng = np.random.default_rng(7)
    n = 200
    records = llava_pool(tmp_path / "pool.json", n, rng)
    table = score_table(n, TASKS[:2], rng)
    if specialist is not None:
        table.info.description = json.dumps(
            {
                "influence": {
                    "specialist": specialist,
                    "num_validation": {t: {t: 5} for t in TASKS[:2]},
                    "checkpoints": ["c1"],
                    "learning_rates": [1e-4],
                    "checkpoint_weights": [1.0],
                    "projection": {"kind": "identity", "dim": 8, "seed": 0},
                    "preconditioner": {"feature": "sgd"},
                    "skipped": [],
                    "pool_rows": n,
                }
            }
        )
    scores = select(table, fraction=0.2, task_floor=task_floor)
    export_dir = export_selection(str(tmp_path / "pool.json"), scores, tmp_path / "export")
    report = write_report(export_dir)
    markdown = open(report, encoding="utf-8").read()
    data = json.load(open(os.path.join(export_dir, "report", "report.json")))
    assert data["score_label"] == label and f"Each task's score is its {label}." in markdown
    assert "(0-1)s" not in markdown
    assert ("Scores pile up near 1 by construction" in markdown) == label.startswith("percentile")
    assert f"| per-task floor | {floor_text} |" in markdown
    floors = data["floor_rows_per_task"]
    assert (f"Per-task floors reserve each task's own top {floors} rows" in markdown) == bool(floors)
    assert len(records) == n


def test_report_counts_votes_as_select_did_with_inclusive_thresholds(tmp_path):
    """Ties at the threshold (scores with one decimal): the paper preset votes on >=, and so does the report."""
    rng = np.random.default_rng(3)
    n = 120
    llava_pool(tmp_path / "pool.json", n, rng)
    table = score_table(n, TASKS, rng, decimals=1)
    scores = select(table, fraction=0.2, preset="paper")
    export_dir = export_selection(str(tmp_path / "pool.json"), scores, tmp_path / "export")
    write_report(export_dir)
    data = json.load(open(os.path.join(export_dir, "report", "report.json")))
    assert data["threshold_inclusive"] is True
    thresholds = provenance(scores)["selection"]["thresholds"]
    at_or_above = {t: int((np.asarray(table[f"influence_{t}"]) >= np.float32(thresholds[t])).sum()) for t in TASKS}
    above = {t: int((np.asarray(table[f"influence_{t}"]) > np.float32(thresholds[t])).sum()) for t in TASKS}
    assert data["top_set_sizes"] == at_or_above and at_or_above != above  # the ties decide
    votes = np.asarray(scores["votes"])
    selected = np.asarray(scores["selected"])
    expected = {str(v): {"pool": int((votes == v).sum()), "selected": int(((votes == v) & selected).sum())}
                for v in range(len(TASKS) + 1)}
    assert data["vote_histogram"] == expected
