"""Source text shared by the worker scripts of test_distributed.py and test_resume.py. Those scripts are written
to a temporary folder and run in fresh processes (under accelerate launch / torchrun, or killed midway), so they
carry this text rather than import a test module."""

TINY_LLAMA = r'''
import hashlib

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def build_base(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def build_model(seed=0):
    base = build_base(seed)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def build_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(4, 24))
        ids = rng.integers(1, 64, length).tolist()
        cut = int(rng.integers(1, length - 1))
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def with_record_hashes(rows, salt=""):
    # What icons_hf.data adds to a formatted row: a hash of its source record (text; never a model input).
    return [{**r, "id": f"r{i}", "record_hash": hashlib.sha256(f"{salt}{i}:{r['input_ids']}".encode()).hexdigest()}
            for i, r in enumerate(rows)]
'''
