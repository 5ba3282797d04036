"""Source text shared by the worker scripts of test_distributed.py and test_resume.py. Those scripts are written
to a temporary folder and run in fresh processes (under accelerate launch / torchrun, or killed midway); they
rebuild the test's model and rows from the same builders and seeds (icons_hf.testing)."""

TINY_LLAMA = r'''
import hashlib

import numpy as np
import torch
from datasets import Dataset

from icons_hf.testing import tiny_llama, tiny_lora_llama, token_rows


def build_base(seed=0):
    return tiny_llama(seed)


def build_model(seed=0):
    return tiny_lora_llama(seed)


def build_rows(n, seed):
    return token_rows(n, seed, max_len=24)


def with_record_hashes(rows, salt=""):
    # What icons_hf.data adds to a formatted row: a hash of its source record (text; never a model input).
    return [{**r, "id": f"r{i}", "record_hash": hashlib.sha256(f"{salt}{i}:{r['input_ids']}".encode()).hexdigest()}
            for i, r in enumerate(rows)]
'''
