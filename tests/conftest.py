import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


@pytest.fixture
def tiny_lora_llama():
    """A 2-layer Llama with LoRA (non-zero B, so every adapter weight has a gradient), built from a config."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed: int = 0, vocab_size: int = 64):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    return build


@pytest.fixture
def token_rows():
    """Random token rows of uneven length with a supervised suffix."""
    import numpy as np

    def build(n: int, seed: int = 0, vocab_size: int = 64, min_len: int = 4, max_len: int = 14):
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            length = int(rng.integers(min_len, max_len))
            ids = rng.integers(1, vocab_size, length).tolist()
            cut = int(rng.integers(1, length - 1))
            rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        return rows

    return build
