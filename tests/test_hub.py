"""End-to-end tests of icons_hf.push_selection through the real push_to_hub / load_dataset code paths.

The Hub is the in-memory fake of tests/hub_server.py on 127.0.0.1. The HF libraries read HF_ENDPOINT
(and HF_HUB_OFFLINE) when imported, and this test session runs offline, so every push/load scenario
runs in a subprocess started with `hub_env` (the fake endpoint, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1,
a private HF_HOME, no inherited token) and a socket guard that refuses any non-loopback connection.
Errors raised before any network access are tested in-process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

try:
    from .hub_server import HubServer, hub_env, run_python
except ImportError:  # tests/ is not a package
    from hub_server import HubServer, hub_env, run_python

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TestTokenNeverStored0123456789"
MARKER = "BODY-MARKER: rows chosen by influence consensus."
CARD_YAML = {
    "license": "mit",
    "pretty_name": "Tiny ICONS selection",
    "task_categories": ["text-generation"],
    "size_categories": ["n<1K"],
    "tags": ["icons", "data-selection"],
}


# -- export folders built by hand ---------------------------------------------------------------


def _write_common(
    out: Path, *, fmt: str, pool_rows: int, positions: list[int], subset_file: str | None, local_data_files: str
) -> None:
    from datasets import Dataset

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    selected = np.zeros(pool_rows, dtype=bool)
    selected[positions] = True
    Dataset.from_dict(
        {
            "index": list(range(pool_rows)),
            "influence_vqa": rng.normal(size=pool_rows).tolist(),
            "influence_mme": rng.normal(size=pool_rows).tolist(),
            "votes": rng.integers(0, 3, size=pool_rows).tolist(),
            "selected": selected.tolist(),
        }
    ).to_parquet(str(out / "scores.parquet"))
    (out / "indices.json").write_text(json.dumps(positions))
    (out / "selection.json").write_text(
        json.dumps(
            {
                "pool": {"name": "tiny", "format": fmt, "num_rows": pool_rows, "path": None},
                "subset_file": subset_file,
                "method": "vote",
                "fraction": len(positions) / pool_rows,
                "num_selected": len(positions),
            }
        )
    )
    meta = {
        **CARD_YAML,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": local_data_files}]}],
    }
    (out / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# Tiny selection\n\n{MARKER}\n")


def make_hf_export(out: Path) -> list[dict]:
    """An 'hf' pool of 10 rows, 3 selected; returns the selected rows."""
    from datasets import Dataset

    pool = Dataset.from_dict(
        {
            "text": [f"question {i}" for i in range(10)],
            "label": [i % 3 for i in range(10)],
            "scores": [[float(i), float(-i)] for i in range(10)],
        }
    )
    positions = [1, 4, 7]
    subset = pool.select(positions)
    _write_common(out, fmt="hf", pool_rows=10, positions=positions, subset_file=None, local_data_files="data/*.parquet")
    (out / "data").mkdir(exist_ok=True)
    subset.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    return subset.to_list()


def _png(path: Path, seed: int) -> np.ndarray:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def make_llava_export(out: Path, images: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """A LLaVA JSON pool of 6 records, 3 selected (the first without an image); returns them and the pixels."""
    pixels = {"coco/a.png": _png(images / "coco" / "a.png", 1), "ocr/b.png": _png(images / "ocr" / "b.png", 2)}
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    pool = [
        {"id": "r0", "image": "coco/a.png", "conversations": conv("<image>\nWhat?", "A.")},
        {"id": "r1", "conversations": conv("Text only?", "Yes.")},
        {"id": "r2", "image": "coco/a.png", "conversations": conv("<image>\nColour?", "Red.")},
        {"id": "r2", "image": "ocr/b.png", "conversations": conv("<image>\nRead it.", "B.")},  # repeated id
        {"id": "r4", "conversations": conv("Hi?", "Hello.")},
        {"id": "r5", "image": "ocr/b.png", "conversations": conv("<image>\nTitle?", "None.")},
    ]
    positions = [1, 2, 3]
    chosen = [pool[i] for i in positions]
    _write_common(
        out,
        fmt="llava_json",
        pool_rows=len(pool),
        positions=positions,
        subset_file="tiny_icons.json",
        local_data_files="tiny_icons.json",
    )
    (out / "tiny_icons.json").write_text(json.dumps(chosen))
    return chosen, pixels


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


SCENARIOS = """
import traceback
from pathlib import Path
import numpy as np
from datasets import load_dataset
from icons_hf.hub import push_selection

def hf_push(d):
    url = push_selection(d["export"], "icons/tiny-hf", token=TOKEN, private=True)
    rows = load_dataset("icons/tiny-hf", split="train", token=TOKEN)
    scores = load_dataset("icons/tiny-hf", "scores", split="train", token=TOKEN)
    return {"url": url, "rows": rows.to_list(), "scores": scores.to_dict(),
            "features": {k: str(v) for k, v in rows.features.items()}}

def llava_push(d):
    push_selection(d["export"], "icons/tiny-llava", token=TOKEN, max_shard_size=1 << 20)
    records = load_dataset("icons/tiny-llava", split="train")
    push_selection(d["export"], "icons/tiny-llava-img", token=TOKEN, embed_images=True,
                   image_folder=d["images"], push_scores=False)
    embedded = load_dataset("icons/tiny-llava-img", split="train")
    return {
        "records": records.to_list(),
        "embedded_features": {k: type(v).__name__ for k, v in embedded.features.items()},
        "embedded_pixels": [None if im is None else np.asarray(im.convert("RGB")).tolist()
                            for im in embedded["image"]],
        "embedded_ids": list(embedded["id"]),
    }

def revision_push(d):
    # no token argument: the PR push takes it from HF_TOKEN, the branch push from the cached login
    os.environ["HF_TOKEN"] = TOKEN
    try:
        pr_url = push_selection(d["export"], "icons/tiny-pr", create_pr=True)
    finally:
        del os.environ["HF_TOKEN"]
    token_file = Path(os.environ["HF_TOKEN_PATH"])
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    try:
        branch_url = push_selection(d["export"], "icons/tiny-branch", revision="dev", commit_message="Selection v1")
    finally:
        token_file.unlink()
    on_branch = load_dataset("icons/tiny-branch", split="train", revision="dev")
    return {"pr_url": pr_url, "branch_url": branch_url, "branch_rows": len(on_branch)}

RESULT = {}
for name, fn in [("hf_push", hf_push), ("llava_push", llava_push), ("revision_push", revision_push)]:
    try:
        RESULT[name] = {"value": fn(DIRS[name])}
    except Exception:
        RESULT[name] = {"error": traceback.format_exc()}
"""


@pytest.fixture(scope="module")
def pushes(hub, tmp_path_factory):
    """Run every push/load scenario in ONE subprocess (importing icons_hf once is the slow part).

    Each scenario's outcome is recorded separately, so one failing scenario fails only its own tests.
    """
    tmp = tmp_path_factory.mktemp("pushes")
    hf_expected = make_hf_export(tmp / "hf" / "export")
    chosen, pixels = make_llava_export(tmp / "llava" / "export", tmp / "llava" / "images")
    make_hf_export(tmp / "rev" / "export")
    dirs = {
        "hf_push": {"export": str(tmp / "hf" / "export")},
        "llava_push": {"export": str(tmp / "llava" / "export"), "images": str(tmp / "llava" / "images")},
        "revision_push": {"export": str(tmp / "rev" / "export")},
    }
    out = run_python(
        "import logging, os\nlogging.basicConfig(level=logging.INFO)\n"
        "logging.getLogger('icons_hf').setLevel(logging.DEBUG)\n"
        f"TOKEN = {TOKEN!r}\nDIRS = {dirs!r}\n" + SCENARIOS,
        env=hub_env(hub.url, tmp),
        cwd=REPO_ROOT,
    )
    return {"out": out, "hf_expected": hf_expected, "chosen": chosen, "pixels": pixels}


def _scenario(pushes: dict, hub: HubServer, name: str) -> dict:
    outcome = pushes["out"]["result"][name]
    if "error" in outcome:
        pytest.fail(f"scenario {name} failed in the subprocess:\n{outcome['error']}", pytrace=False)
    assert not hub.unknown_routes, f"client used routes the fake Hub does not know: {hub.unknown_routes}"
    return outcome["value"]


@pytest.fixture(scope="module")
def hf_push(pushes, hub):
    """An 'hf' export pushed to a private repo with an explicit token, then both configs loaded."""
    return {"result": _scenario(pushes, hub, "hf_push"), "expected": pushes["hf_expected"]}


@pytest.fixture(scope="module")
def llava_push(pushes, hub):
    """A LLaVA export pushed twice: records only (default) and with embed_images=True."""
    return {"result": _scenario(pushes, hub, "llava_push"), "chosen": pushes["chosen"], "pixels": pushes["pixels"]}


@pytest.fixture(scope="module")
def revision_push(pushes, hub):
    """Pushes to a pull request (token from HF_TOKEN) and to a branch (token from the cached login)."""
    return {"result": _scenario(pushes, hub, "revision_push")}


# -- end-to-end tests -----------------------------------------------------------------------------


def test_hf_pool_roundtrip_returns_exactly_the_selected_rows(hf_push):
    result = hf_push["result"]
    assert result["rows"] == hf_push["expected"]
    assert set(result["features"]) == {"text", "label", "scores"}
    assert result["url"].startswith("http://127.0.0.1:") and "/datasets/icons/tiny-hf/commit/" in result["url"]


def test_scores_config_loads(hf_push):
    scores = hf_push["result"]["scores"]
    assert scores["index"] == list(range(10))
    assert [i for i, s in enumerate(scores["selected"]) if s] == [1, 4, 7]
    assert {"influence_vqa", "influence_mme", "votes"} <= set(scores)


def test_repo_is_private_and_files_are_parquet(hub, hf_push):
    assert hub.repo("icons/tiny-hf").private
    files = hub.files("icons/tiny-hf")
    assert "data/train-00000-of-00001.parquet" in files and "scores/train-00000-of-00001.parquet" in files
    assert files["data/train-00000-of-00001.parquet"][:4] == b"PAR1"


def _card(hub: HubServer, repo_id: str, revision: str = "main") -> tuple[dict, str]:
    from huggingface_hub import DatasetCard

    card = DatasetCard(hub.files(repo_id, revision)["README.md"].decode("utf-8"))
    return card.data.to_dict(), card.text


def test_card_keeps_export_yaml_and_body_and_declares_both_configs(hub, hf_push):
    data, text = _card(hub, "icons/tiny-hf")
    for key, value in CARD_YAML.items():
        assert data[key] == value, key
    assert MARKER in text and "# Tiny selection" in text
    configs = {c["config_name"]: c for c in data["configs"]}
    assert set(configs) == {"default", "scores"}
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert configs["scores"]["data_files"] == [{"split": "train", "path": "scores/train-*"}]
    infos = {i["config_name"]: i for i in data["dataset_info"]}
    assert infos["default"]["splits"][0]["num_examples"] == 3
    assert infos["scores"]["splits"][0]["num_examples"] == 10


def test_token_only_in_authorization_headers(hub, pushes, hf_push, llava_push, revision_push):
    writes = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    for r in hub.requests:
        assert TOKEN not in r.path and TOKEN not in json.dumps(r.query), r.path
        assert TOKEN.encode() not in r.body, f"token in the body of {r.method} {r.path}"
    for label, data in hub.all_stored_bytes():
        assert TOKEN.encode() not in data, f"token stored in {label}"
    # nothing printed or logged it (the child logs at INFO, icons_hf at DEBUG)
    assert TOKEN not in pushes["out"]["stdout"] and TOKEN not in pushes["out"]["stderr"]


def test_llava_records_pushed_as_records(hub, llava_push):
    rows = llava_push["result"]["records"]
    expected = [
        {"id": r["id"], "image": r.get("image"), "conversations": r["conversations"]} for r in llava_push["chosen"]
    ]
    assert rows == expected  # a text-only first record does not drop the image column
    data, text = _card(hub, "icons/tiny-llava")
    assert {c["config_name"] for c in data["configs"]} == {"default", "scores"}
    assert data["license"] == "mit" and MARKER in text
    assert "tiny_icons.json" not in hub.files("icons/tiny-llava")  # records go as parquet, not the raw file


def test_embed_images_gives_image_column_with_source_pixels(hub, llava_push):
    result = llava_push["result"]
    assert result["embedded_features"]["image"] == "Image"
    assert result["embedded_ids"] == ["r1", "r2", "r2"]
    got = result["embedded_pixels"]
    assert got[0] is None
    for row, record in zip(got[1:], llava_push["chosen"][1:], strict=True):
        np.testing.assert_array_equal(np.asarray(row, dtype=np.uint8), llava_push["pixels"][record["image"]])
    data, _ = _card(hub, "icons/tiny-llava-img")
    assert [c["config_name"] for c in data["configs"]] == ["default"]  # push_scores=False


def test_create_pr_and_branch(hub, revision_push):
    result = revision_push["result"]
    assert result["pr_url"].endswith("/datasets/icons/tiny-pr/discussions/1")
    repo = hub.repo("icons/tiny-pr")
    assert set(hub.files("icons/tiny-pr")) == {".gitattributes"}  # main untouched
    assert [r for r in repo.refs if r.startswith("refs/pr/")] == ["refs/pr/1"]  # one PR for all commits
    pr_files = hub.files("icons/tiny-pr", "refs/pr/1")
    assert {"README.md", "data/train-00000-of-00001.parquet", "scores/train-00000-of-00001.parquet"} <= set(pr_files)
    data, _ = _card(hub, "icons/tiny-pr", "refs/pr/1")
    assert {c["config_name"] for c in data["configs"]} == {"default", "scores"}

    assert set(hub.files("icons/tiny-branch")) == {".gitattributes"}
    assert "README.md" in hub.files("icons/tiny-branch", "dev")
    assert result["branch_rows"] == 3
    titles = {c.title for c in hub.repo("icons/tiny-branch").commits.values()}
    assert "Selection v1" in titles


# -- the fake Hub itself ---------------------------------------------------------------------------


def _http(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_fake_hub_rejects_unknown_routes_and_missing_tokens():
    with HubServer(token=TOKEN) as server:
        status, headers, _ = _http(f"{server.url}/api/spaces-nonsense/x")
        assert status == 404 and headers["X-Error-Message"].startswith("hub_server: unknown route GET")
        assert server.unknown_routes == ["GET /api/spaces-nonsense/x"]
        body = json.dumps({"name": "r", "organization": "o", "type": "dataset"}).encode()
        assert _http(f"{server.url}/api/repos/create", "POST", body)[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert _http(f"{server.url}/api/repos/create", "POST", body, auth)[0] == 200
        assert _http(f"{server.url}/api/repos/create", "POST", body, auth)[0] == 409
        url = f"{server.url}/datasets/o/r/resolve/main/.gitattributes"
        status, headers, data = _http(url, headers={"Range": "bytes=2-5"})
        assert status == 206 and data == server.files("o/r")[".gitattributes"][2:6]
        assert headers["X-Repo-Commit"] == server.repo("o/r").refs["main"]
        status, headers, _ = _http(f"{server.url}/datasets/o/r/resolve/main/missing.txt")
        assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
        assert server.requests[1].authorization is None and server.requests[2].authorization == f"Bearer {TOKEN}"


# -- errors raised before any network access (in-process, offline) ----------------------------


@pytest.mark.parametrize(
    "name", ["README.md", "selection.json", "indices.json", "scores.parquet", "data/train-00000-of-00001.parquet"]
)
def test_missing_export_file_is_named(tmp_path, name):
    from icons_hf.hub import push_selection

    make_hf_export(tmp_path)
    os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="export_selection") as err:
        push_selection(tmp_path, "icons/never-pushed", token=TOKEN)
    assert Path(name).name in str(err.value)


def test_missing_llava_records_file_is_named(tmp_path):
    from icons_hf.hub import push_selection

    make_llava_export(tmp_path / "export", tmp_path / "images")
    os.remove(tmp_path / "export" / "tiny_icons.json")
    with pytest.raises(FileNotFoundError, match="tiny_icons.json"):
        push_selection(tmp_path / "export", "icons/never-pushed")


def test_not_a_folder(tmp_path):
    from icons_hf.hub import push_selection

    with pytest.raises(FileNotFoundError, match="export_selection"):
        push_selection(tmp_path / "nope", "icons/never-pushed")


def test_missing_image_names_row_and_path(tmp_path):
    from icons_hf.hub import push_selection

    make_llava_export(tmp_path / "export", tmp_path / "images")
    os.remove(tmp_path / "images" / "ocr" / "b.png")
    with pytest.raises(FileNotFoundError, match=r"row 2 \(id='r2'\).*'ocr/b.png'.*image_folder"):
        push_selection(tmp_path / "export", "icons/never-pushed", embed_images=True, image_folder=tmp_path / "images")


def test_embed_images_argument_errors(tmp_path):
    from icons_hf.hub import push_selection

    make_llava_export(tmp_path / "export", tmp_path / "images")
    with pytest.raises(ValueError, match="image_folder"):
        push_selection(tmp_path / "export", "icons/never-pushed", embed_images=True)
    with pytest.raises(ValueError, match="embed_images"):
        push_selection(tmp_path / "export", "icons/never-pushed", image_folder=tmp_path / "images")
    make_hf_export(tmp_path / "hf")
    with pytest.raises(ValueError, match="LLaVA"):
        push_selection(tmp_path / "hf", "icons/never-pushed", embed_images=True, image_folder=tmp_path)


def test_inconsistent_export_is_refused(tmp_path):
    from icons_hf.hub import push_selection

    make_hf_export(tmp_path)
    (tmp_path / "indices.json").write_text(json.dumps([1, 4]))
    with pytest.raises(ValueError, match="indices.json"):
        push_selection(tmp_path, "icons/never-pushed")
