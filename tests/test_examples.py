"""The example scripts (examples/llava, examples/text) run end to end on tiny models saved to disk, in
subprocesses as users run them (plain python, accelerate launch); the shipped accelerate configs load; and
``format_chat`` supervises exactly the assistant turns."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from icons_hf import load_gradients, recipes
from icons_hf.settings import FeatureSettings, InfluenceSettings, SelectionSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
LLAVA = os.path.join(EXAMPLES, "llava", "icons_llava.py")
TEXT = os.path.join(EXAMPLES, "text", "icons_text.py")
CONFIGS = os.path.join(EXAMPLES, "configs")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("what is the colour shape of a red blue green circle square sky grass answer yes no please tell me "
         "be brief you are helpful assistant user system one two three four").split()


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str], timeout: int = 240, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def word_tokenizer(extra_special=(), chat_template=None):
    """A word-level fast tokenizer built in code (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", *extra_special]
    vocab = {tok: i for i, tok in enumerate(special)}
    for word in [*WORDS, *"?.,:!"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=list(extra_special))
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


# --------------------------------------------------------------------------------------------- format_chat


def _chatml_reference(messages, tokenizer):
    """Ids and labels built by hand from the ChatML layout, one piece per turn (independent of format_chat)."""
    ids, labels = [], []
    for m in messages:
        head = tokenizer(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(f"{m['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, labels


def _random_chat(rng):
    messages = [{"role": "system", "content": _sentence(rng, 3)}] if rng.random() < 0.5 else []
    for _ in range(int(rng.integers(1, 4))):
        messages.append({"role": "user", "content": _sentence(rng, int(rng.integers(1, 6)))})
        messages.append({"role": "assistant", "content": _sentence(rng, int(rng.integers(1, 6)))})
    return messages


@pytest.mark.parametrize("with_generation_prompt", [True, False])
def test_format_chat_supervises_exactly_assistant_turns(with_generation_prompt):
    from icons_hf.data import format_chat

    template = CHATML if with_generation_prompt else CHATML.split("{% if")[0]
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>"], template)
    rng = np.random.default_rng(1)
    for _ in range(20):
        messages = _random_chat(rng)
        ids, labels = format_chat(messages, tokenizer)
        ref_ids, ref_labels = _chatml_reference(messages, tokenizer)
        assert ids == ref_ids
        assert labels == ref_labels
        assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_format_chat_errors_name_the_row():
    from icons_hf.data import format_chat, prepare_chat_dataset

    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML)
    with pytest.raises(ValueError, match="row 3: the chat has no assistant message"):
        format_chat([{"role": "user", "content": "what is one"}], tokenizer, row=3)
    with pytest.raises(ValueError, match="row 1: message 0 has no text 'content'"):
        good = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]}
        prepare_chat_dataset([good, {"messages": [{"role": "user"}]}], tokenizer)
    with pytest.raises(ValueError, match="row 0 has no 'messages'"):
        prepare_chat_dataset([{"chat": []}], tokenizer)
    # A template that renders the last turn differently rewrites earlier turns as the chat grows.
    unstable = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(ValueError, match="prefix of the whole chat"):
        format_chat([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}], tokenizer,
                    chat_template=unstable)


# ------------------------------------------------------------------------------------------- tiny models


def _write_png(path, rng):
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def llava_setup(tmp_path_factory):
    """A tiny LlavaForConditionalGeneration + tokenizer + CLIPImageProcessorPil saved to disk, a LLaVA JSON pool
    (with two text-only rows, as LLaVA-665K has) and two validation files with PNG images."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(0)
    tokenizer = word_tokenizer(["<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token, image_seq_length=4, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model_dir = root / "model"
    LlavaForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(model_dir)

    images = root / "images"
    images.mkdir()

    def records(prefix, n, text_only=()):
        out = []
        for i in range(n):
            conv = [{"from": "human", "value": f"<image>\n{_sentence(rng, 4)} ?"},
                    {"from": "gpt", "value": _sentence(rng, int(rng.integers(1, 4)))}]
            if rng.random() < 0.3:
                conv += [{"from": "human", "value": _sentence(rng, 3)}, {"from": "gpt", "value": _sentence(rng, 2)}]
            record = {"id": f"{prefix}-{i % 7}", "conversations": conv}  # ids repeat, as in LLaVA-665K
            if i in text_only:
                conv[0]["value"] = conv[0]["value"].replace("<image>\n", "")
            else:
                name = f"{prefix}_{i}.png"
                _write_png(images / name, rng)
                record["image"] = name
            out.append(record)
        return out

    pool = records("pool", 30, text_only=(5, 17))
    (root / "pool.json").write_text(json.dumps(pool))
    (root / "color.json").write_text(json.dumps(records("color", 5)))
    (root / "shape.jsonl").write_text("\n".join(json.dumps(r) for r in records("shape", 4)))
    (root / "count_a.json").write_text(json.dumps(records("count_a", 3)))
    # A task held in a datasets folder with an Image column, as a Hub dataset would be.
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import Image

    held = records("count_b", 3)
    Dataset.from_dict({
        "id": [r["id"] for r in held],
        "image": [Image.open(images / r["image"]) for r in held],
        "conversations": [r["conversations"] for r in held],
    }).cast_column("image", ImageFeature()).save_to_disk(root / "count_b")
    return root


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A tiny LlamaForCausalLM + a ChatML tokenizer saved to disk, a chat JSONL pool and two validation files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(2)
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    ))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    def write(name, n):
        with open(root / name, "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"messages": _random_chat(rng)}) + "\n")

    write("pool.jsonl", 40)
    write("math.jsonl", 4)
    write("chat.jsonl", 5)
    from datasets import Dataset

    # The same task as a datasets folder, as a Hub dataset would arrive.
    Dataset.from_list([json.loads(line) for line in open(root / "chat.jsonl")]).save_to_disk(root / "chat_ds")
    return root


def _check_export(subset_dir, pool_file, fraction, n_pool):
    files = os.listdir(subset_dir)
    assert {"README.md", "selection.json", "indices.json", "scores.parquet"} <= set(files)
    stem, ext = os.path.splitext(os.path.basename(pool_file))
    subset_file = os.path.join(subset_dir, f"{stem}_icons{ext}")
    with open(pool_file) as handle:
        pool = json.load(handle) if ext == ".json" else [json.loads(line) for line in handle if line.strip()]
    with open(subset_file) as handle:
        subset = json.load(handle) if ext == ".json" else [json.loads(line) for line in handle if line.strip()]
    assert len(pool) == n_pool
    assert len(subset) == math.floor(fraction * n_pool)
    with open(os.path.join(subset_dir, "indices.json")) as handle:
        indices = json.load(handle)
    assert indices == sorted(set(indices)) and len(indices) == len(subset)
    assert subset == [pool[i] for i in indices]  # the original records, by position
    with open(os.path.join(subset_dir, "README.md")) as handle:
        card = handle.read()
    assert card.startswith("---\n") and "ICONS" in card
    with open(os.path.join(subset_dir, "selection.json")) as handle:
        return json.load(handle), indices


# -------------------------------------------------------------------------------------------- the scripts


def test_llava_example_end_to_end_and_push(llava_setup, tmp_path):
    """The LLaVA script as users run it (plain python), up to --push-to-hub against the in-process fake Hub."""
    try:
        from .hub_server import HubServer, hub_env
    except ImportError:  # tests/ is not a package
        from hub_server import HubServer, hub_env

    root = llava_setup
    out = tmp_path / "run"
    server = HubServer(token="hf_ExampleTestToken0123456789").start()
    env = hub_env(server.url, tmp_path, base=_env())
    env["HF_TOKEN"] = server.token
    try:
        log = _run([
            sys.executable, LLAVA, "--model", str(root / "model"), "--data-path", str(root / "pool.json"),
            "--image-folder", str(root / "images"), "--task", f"color={root / 'color.json'}",
            "--task", f"shape={root / 'shape.jsonl'}:{root / 'images'}", "--task", f"count/a={root / 'count_a.json'}",
            "--task", f"count/b={root / 'count_b'}", "--output-dir", str(out),
            "--lora-r", "4", "--warmup-fraction", "0.3", "--num-train-epochs", "2",
            "--per-device-train-batch-size", "4",
            "--num-checkpoints", "2", "--dim", "64", "--feature-batch-size", "4", "--fraction", "0.25",
            "--learning-rate", "1e-3", "--push-to-hub", "tester/llava-icons",
        ], env=env)
        pushed = server.files("tester/llava-icons")
    finally:
        server.stop()
    meta, indices = _check_export(out / "subset", root / "pool.json", 0.25, 30)
    assert "README.md" in pushed and "Pushed the subset to" in log
    with open(out / "subset" / "README.md", encoding="utf-8") as handle:
        body = handle.read().split("\n---\n", 1)[1]  # the card after its YAML header
    assert body in pushed["README.md"].decode("utf-8") and "ICONS" in body
    assert "Selected 7 of 30 pool rows" in log
    influence = meta["influence"]
    assert influence["num_validation"] == {"color": {"color": 5}, "shape": {"shape": 4}, "count": {"a": 3, "b": 3}}
    # The text-only rows are a sub-pool of their own at every checkpoint, scored with the image rows as one pool.
    for checkpoint in influence["checkpoints"]:
        parts = out / "warmup" / "icons" / checkpoint / "train"
        assert {p: load_gradients(parts / p).num_rows for p in ("image", "text")} == {"image": 28, "text": 2}
    assert len(influence["checkpoints"]) == 2 and all(lr > 0 for lr in influence["learning_rates"])
    import pyarrow.parquet as pq

    scores = pq.read_table(out / "subset" / "scores.parquet").to_pydict()
    assert sorted(scores["index"]) == list(range(30))  # both sub-pools scored, mapped to pool positions
    assert [i for i, s in zip(scores["index"], scores["selected"], strict=True) if s] == indices
    assert len(os.listdir(out / "task_images" / "count" / "b")) == 3  # the held images, written for the loader
    for task in ("color", "shape", "count"):
        assert np.isfinite(scores[f"influence_{task}"]).all() and np.std(scores[f"influence_{task}"]) > 0


def _script(path):
    """An example script imported as a module (to call its main() in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
def test_text_example_ddp_then_offline_from_checkpoints(text_setup, tmp_path):
    """The text script under accelerate launch with the shipped DDP config and two CPU processes (each computes
    its share of rows, one subset comes out); then the same features from the saved checkpoints without training
    (the path for ZeRO-3/FSDP warmups), in one process."""
    root = text_setup
    common_args = [
        "--model", str(root / "model"), "--data-path", str(root / "pool.jsonl"),
        "--task", f"math={root / 'math.jsonl'}", "--task", f"chat={root / 'chat_ds'}",
        "--lora-r", "4", "--dim", "128", "--feature-batch-size", "8", "--fraction", "0.3",
    ]
    warm = tmp_path / "warm"
    log = _run([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, "ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()), TEXT, *common_args, "--output-dir", str(warm),
        "--warmup-fraction", "0.5", "--max-steps", "4", "--per-device-train-batch-size", "2", "--num-checkpoints", "2",
        "--learning-rate", "1e-3",
    ], timeout=300)
    with open(warm / "warmup" / "checkpoint-4" / "trainer_state.json") as handle:
        state = json.load(handle)
    # 20 warmup rows, 2 per process and step: 5 steps per epoch with two processes (10 with one).
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(0.8)
    meta, indices = _check_export(warm / "subset", root / "pool.jsonl", 0.3, 40)
    assert "Selected 12 of 40 pool rows" in log
    assert meta["influence"]["checkpoints"] == ["checkpoint-2", "checkpoint-4"]

    offline = tmp_path / "offline"
    checkpoints = [str(warm / "warmup" / c) for c in ("checkpoint-2", "checkpoint-4")]
    _script(TEXT).main([*common_args, "--output-dir", str(offline), "--checkpoints", *checkpoints])
    offline_meta, offline_indices = _check_export(offline / "subset", root / "pool.jsonl", 0.3, 40)
    assert offline_indices == indices
    assert offline_meta["influence"]["learning_rates"] == pytest.approx(meta["influence"]["learning_rates"])
    for c in ("checkpoint-2", "checkpoint-4"):
        live = load_gradients(warm / "warmup" / "icons" / c / "train" / "pool").with_format("numpy")[:]
        saved = load_gradients(offline / "icons" / c / "train" / "pool").with_format("numpy")[:]
        np.testing.assert_array_equal(live["index"], saved["index"])
        np.testing.assert_allclose(saved["features"], live["features"], rtol=1e-3, atol=1e-4)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("extra, message", [
    (["--task", "math"], "expected NAME=SOURCE"),
    (["--task", "math=nope.jsonl"], "nope.jsonl does not exist"),
    (["--task", "math=math.jsonl", "--fraction", "1.5"], "fraction=1.5 must be a number in (0"),
    (["--task", "math=math.jsonl", "--projection", "gaussian"], "--projection: invalid choice: 'gaussian'"),
    (["--task", "math=math.jsonl", "--preset", "released"], "--preset: invalid choice: 'released'"),
    (["--task", "math=math.jsonl", "--task", "math/a=chat.jsonl"], "given both with and without a /SUBTASK"),
    (["--task", "math=math.jsonl", "--method", "task"], "--method task needs --select-task"),
    (["--task", "math=math.jsonl", "--lora-target-modules", "q_proj", "--lora-target-regex", ".*"], "not both"),
    (["--task", "math=math.jsonl", "--checkpoints", "nowhere"], "--checkpoints: nowhere is not a folder"),
    (["--task", "math=math.jsonl", "--dim", "0"], "dim=0 must be an integer >= 1"),
])
def test_bad_arguments_are_reported_by_name(text_setup, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(text_setup)
    with pytest.raises(SystemExit) as exit_info:
        _script(TEXT).main(["--model", "model", "--data-path", "pool.jsonl", "--output-dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_features_only_warms_up(text_setup, tmp_path):
    """--no-features (the first step of a ZeRO-3/FSDP run) saves the checkpoints and computes no feature."""
    root = text_setup
    result = _script(TEXT).main([
        "--model", str(root / "model"), "--data-path", str(root / "pool.jsonl"),
        "--task", f"math={root / 'math.jsonl'}", "--output-dir", str(tmp_path), "--lora-r", "4", "--max-steps", "2",
        "--num-checkpoints", "2", "--warmup-fraction", "0.2", "--no-features",
    ])
    assert result is None
    assert sorted(os.listdir(tmp_path / "warmup")) == ["checkpoint-1", "checkpoint-2"]
    assert os.path.isfile(tmp_path / "warmup" / "checkpoint-2" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "warmup" / "icons") and not os.path.exists(tmp_path / "subset")


@pytest.mark.parametrize("script, extra, modules, regex", [
    (LLAVA, [], None, r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"),
    (LLAVA, ["--lora-target-modules", "q_proj"], ["q_proj"], None),
    (TEXT, [], ["q_proj", "k_proj", "v_proj", "o_proj"], None),
    (TEXT, ["--lora-target-regex", r".*\.v_proj"], None, r".*\.v_proj"),
])
def test_lora_target_options_replace_the_script_default(text_setup, monkeypatch, script, extra, modules, regex):
    monkeypatch.chdir(text_setup)
    base = ["--model", "model", "--data-path", "pool.jsonl", "--output-dir", "x", "--task", "math=math.jsonl"]
    _, recipe = recipes.parse_recipe_args(_script(script).make_parser(), [*base, *extra])
    assert (recipe.lora.lora_target_modules, recipe.lora.lora_target_regex) == (modules, regex)


@pytest.mark.parametrize("extra, features, influence, selection", [
    ([], {}, {}, {}),
    (["--preset", "paper"], FeatureSettings.presets["paper"], InfluenceSettings.presets["paper"],
     SelectionSettings.presets["paper"]),
    (["--preset", "paper", "--dim", "64", "--task-floor", "0.5"], {**FeatureSettings.presets["paper"], "dim": 64},
     InfluenceSettings.presets["paper"], {**SelectionSettings.presets["paper"], "task_floor": 0.5}),
    (["--train-feature", "adam", "--projection-seed", "3", "--feature-batch-size", "2", "--feature-dtype", "float32",
      "--specialist", "mean", "--checkpoint-weights", "1", "2", "--influence-batch-size", "64",
      "--select-task", "math", "--method", "task", "--selection-seed", "5", "--threshold-inclusive"],
     {"train_feature": "adam", "seed": 3, "batch_size": 2, "dtype": "float32"},
     {"specialist": "mean", "checkpoint_weights": (1.0, 2.0), "batch_size": 64},
     {"task": "math", "method": "task", "seed": 5, "threshold_inclusive": True}),
])
def test_stage_options_are_the_settings_fields(text_setup, monkeypatch, extra, features, influence, selection):
    """Every stage option fills its settings field (names shared by two stages carry the stage), unset ones keep
    the preset's value, and nothing else differs from the settings classes' own defaults."""
    monkeypatch.chdir(text_setup)
    base = ["--model", "model", "--data-path", "pool.jsonl", "--output-dir", "x", "--task", "math=math.jsonl"]
    _, recipe = recipes.parse_recipe_args(_script(TEXT).make_parser(), [*base, *extra])
    assert recipe.features == FeatureSettings(**features)
    assert recipe.influence == InfluenceSettings(**influence)
    assert recipe.selection == SelectionSettings(**selection)


# --------------------------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("name", ["single.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(CONFIGS, name))
    expected = {"single.yaml": "NO", "ddp.yaml": "MULTI_GPU", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED",
                "fsdp.yaml": "FSDP"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])
