"""Row identity end to end: prepare_llava_dataset -> compute_gradients -> compute_influence -> select -> export.
The pool that was scored exports with its identity verified; the same records shuffled, or one record edited,
are refused naming the first wrong row (JSON file and CLI)."""

import json
import os
import random

import pytest

from icons_hf import compute_gradients, compute_influence, export_selection, select
from icons_hf.cli import main
from icons_hf.data import prepare_llava_dataset
from icons_hf.pools import record_hash
from icons_hf.testing import build_tokenizer

FAST = dict(dim=64, batch_size=4, show_progress=False)


def _records(n):
    words = ["red", "blue", "green", "circle", "square", "yes", "no"]
    return [{"id": f"r{i % 4}",
             "conversations": [{"from": "human", "value": f"what colour is shape {words[i % 3]} ?"},
                               {"from": "gpt", "value": f"{words[(i * 5) % 7]} {words[(i + 3) % 7]}"}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("identity")
    records = _records(12)
    (tmp / "pool.json").write_text(json.dumps(records))
    tok = build_tokenizer([t["value"] for r in records for t in r["conversations"]])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    train = compute_gradients(model, prepare_llava_dataset(str(tmp / "pool.json"), tok), output_dir=tmp / "train",
                              pad_token_id=tok.pad_token_id, **FAST)
    val = compute_gradients(model, prepare_llava_dataset(_records(3), tok), output_dir=tmp / "val",
                            pad_token_id=tok.pad_token_id, **FAST)
    scores = select(compute_influence(train, {"a": val, "b": val}), fraction=0.5)
    scores.save_to_disk(str(tmp / "selected"))
    return tmp, records, scores


def test_the_scored_pool_is_verified(scored):
    tmp, records, scores = scored
    assert scores["record_hash"] == [record_hash(r) for r in records]
    out = export_selection(str(tmp / "pool.json"), scores, tmp / "export")
    assert json.load(open(os.path.join(out, "selection.json")))["row_identity"].startswith("verified")


@pytest.mark.parametrize("change", ["shuffled", "edited"])
def test_another_pool_is_refused_by_export_and_cli(scored, change, capsys):
    tmp, records, scores = scored
    bad = list(records)
    if change == "shuffled":
        random.Random(1).shuffle(bad)
    else:
        bad[5] = {**bad[5], "conversations": [*bad[5]["conversations"][:1], {"from": "gpt", "value": "other"}]}
    first = next(i for i, (a, b) in enumerate(zip(records, bad, strict=True)) if a != b)
    path = tmp / f"{change}.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"is not the pool the scores were computed on: row {first} "):
        export_selection(str(path), scores, tmp / f"export_{change}")
    assert main(["export", "--pool", str(path), "--scores", str(tmp / "selected"), "--output-dir",
                 str(tmp / f"cli_{change}")]) == 2
    assert f"row {first} " in capsys.readouterr().err
