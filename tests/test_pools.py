"""Pool owns its format: a subset written in the pool's own format, images, groups, and the pool as a Dataset."""

import json

import pytest
from datasets import Dataset

from icons_hf.pools import Pool, load_pool, record_hash

RECORDS = [
    {"id": "a", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "q1"}], "source": "vqa"},
    {"id": "b", "conversations": [{"from": "human", "value": "q2"}], "source": "text"},
    {"id": "c", "image": "gqa/2.jpg", "conversations": [{"from": "human", "value": "q3"}], "source": "vqa"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_records_pool_writes_its_subset_unchanged_in_its_own_format(tmp_path, suffix):
    path = tmp_path / f"pool{suffix}"
    path.write_text(json.dumps(RECORDS) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in RECORDS))
    pool = load_pool(path)
    assert (pool.format, pool.subset_file(), pool.has_images()) == (f"llava_{suffix[1:]}", f"pool_icons{suffix}", True)
    pool.write_subset([0, 2], str(tmp_path))
    subset = load_pool(tmp_path / pool.subset_file())
    assert subset.records == [RECORDS[0], RECORDS[2]] and subset.hashes() == [record_hash(RECORDS[i]) for i in (0, 2)]


def test_dataset_pool_writes_parquet_shards(tmp_path):
    pool = load_pool(Dataset.from_list([{"text": f"row {i}", "label": i % 2} for i in range(5)]))
    assert pool.subset_file() is None and not pool.has_images()
    pool.write_subset([4, 1], str(tmp_path))
    shards = sorted((tmp_path / "data").glob("train-*.parquet"))
    assert [s.name for s in shards] == ["train-00000-of-00001.parquet"]
    assert Dataset.from_parquet(str(shards[0]))["text"] == ["row 4", "row 1"]


def test_groups_by_field_source_or_image_folder(tmp_path):
    pool = Pool(name="p", format="llava_json", path="p.json", records=RECORDS)
    assert pool.group_labels() == (["vqa", "text", "vqa"], "source")
    assert pool.group_labels("id") == (["a", "b", "c"], "id")
    without_source = Pool(name="p", format="llava_json", path="p.json",
                          records=[{k: v for k, v in r.items() if k != "source"} for r in RECORDS])
    assert without_source.group_labels() == (["coco", "text-only", "gqa"], "image folder")
    with pytest.raises(ValueError, match="p.json: record 1 has no 'image' field"):
        pool.group_labels("image")
    data = load_pool(Dataset.from_list([{"kind": "x"}, {"kind": "y"}]))
    assert data.group_labels() is None and data.group_labels("kind") == (["x", "y"], "kind")
    with pytest.raises(ValueError, match="has no column 'nope'"):
        data.group_labels("nope")


def test_records_become_a_dataset_with_their_images(tmp_path):
    from PIL import Image

    for rel in ("coco/1.jpg", "gqa/2.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3), "red").save(tmp_path / rel)
    pool = Pool(name="p", format="llava_json", path="p.json", records=RECORDS)
    plain = pool.to_dataset()
    assert plain["image"] == ["coco/1.jpg", None, "gqa/2.jpg"] and plain["id"] == ["a", "b", "c"]
    embedded = pool.to_dataset(image_folder=tmp_path)
    assert [None if im is None else im.size for im in embedded["image"]] == [(4, 3), None, (4, 3)]
    (tmp_path / "gqa" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"p.json: row 2 \(id='c'\) refers to image 'gqa/2.jpg'"):
        pool.to_dataset(image_folder=tmp_path)
