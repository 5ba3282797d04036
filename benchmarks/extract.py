"""Gradient extraction speed against a plain LoRA training step and a batch-size-1 reference recipe, and the
accuracy of the projections, on one model per run section (all in one process, one run).

Models (LoRA r=8, alpha 16, dropout 0.05 on q,k,v,o of the language model):

* ``llama``: a 4-layer, 256-wide Llama (4 heads, MLP 1024, vocabulary 4096) on real English text: docstrings of
  the Python standard library, BPE-tokenized in code, rows of 16-128 tokens whose last 60% are supervised.
* ``llava``: the demo's tiny ``LlavaForConditionalGeneration`` (:func:`icons_hf.testing.build_tiny_llava`, with
  the demo's trainable projector) on easy-VQA rows (16 image tokens + question + answer), ``pixel_values``
  computed once and stored in the dataset.

Each model is first LoRA-trained for ``--warmup-steps`` AdamW steps on other rows. Then, on the same ``--rows``
pool rows and the same batch size:

* (a) ``train``: the plain batched LoRA training step (forward with labels, backward, AdamW step, zero_grad) on
  pre-collated batches, in random order as the Trainer samples them; ``train-grouped`` is the same step on the
  length-grouped batches extraction uses (the fairer compute limit: same padding);
* (b) ``icons/<projection>``: ``compute_gradients`` end to end (reading rows, collation, Adam-LESS features with
  the live optimizer state, projection, writing the float16 store); examples/s is the marginal rate between a
  run on ``--rows`` rows and one on ``--batch-size`` rows, so one-off setup (hash tables, the dense Rademacher
  matrix) is reported apart as ``setup s``;
* (c) ``reference``: the recipe of the released LESS/ICONS code: batch size 1, ``loss.backward()``, the full
  LoRA gradient concatenated, the LESS Adam map, then a dense Rademacher projection whose blocks are regenerated
  from their seeds on every call (as TRAK's CPU projector does); timed on ``--reference-rows`` rows.

Methods are timed in ``--rounds`` rounds (training, then extraction, in the same order each round; rademacher
and the reference in the last round only) and each method's best round is kept, which tames the noise of a shared
machine.

Both wall-clock examples/s and examples per process CPU-second are printed; the ratios use CPU time by
default (``--clock``), which a busy shared machine disturbs far less than wall time (with one intra-op thread
the two agree on an idle machine). Peak memory is the largest RSS seen by a 5 ms sampler thread during the phase,
minus the RSS at its start.
Projection accuracy (llama): Spearman rank correlation between projected and exact (``identity``) cosine
similarities over all pairs of the pool rows, for Adam-LESS and SGD features.

    python benchmarks/extract.py                 # both models, default sizes (about 3 minutes on 2 cores)
    python benchmarks/extract.py --models llama --rows 256 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import tempfile
import threading
import time

import numpy as np

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------------- measuring


class PeakRSS:
    """Largest resident set size seen while the block runs, sampled every 5 ms, relative to its start."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.start = 0

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return False

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


class Clock:
    """Wall-clock and process CPU seconds of the block (``elapsed = (wall, cpu)``)."""

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        self.elapsed = (time.perf_counter() - self._start[0], time.process_time() - self._start[1])
        return False


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pair_cosines(features: np.ndarray) -> np.ndarray:
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    return (x @ x.T)[np.triu_indices(len(x), 1)]


# ------------------------------------------------------------------------------------------------ data, models


def _docstrings(max_chars: int) -> list[str]:
    import importlib

    modules = ["argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
               "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
               "gzip", "hashlib", "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging",
               "mailbox", "multiprocessing", "pathlib", "pickle", "pprint", "random", "re", "sched", "shutil",
               "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "tkinter", "typing", "unittest", "urllib.parse", "uuid", "xml.dom.minidom", "zipfile"]
    texts, total = [], 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter missing from a minimal Python
            continue
        members = sorted(vars(module).items())
        for attr, obj in [(name, module), *members]:
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 300 and doc not in texts:
                texts.append(" ".join(doc.split()))
                total += len(texts[-1])
        if total > max_chars:
            break
    return texts


def text_rows(n: int, seed: int = 0, max_len: int = 128):
    """``n`` rows of English text (standard-library docstrings) and the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = _docstrings(2_000_000)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<pad>", "<s>", "<unk>"], show_progress=False))
    stream = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)])
    rng = np.random.default_rng(seed)
    rows, pos = [], 0
    for _ in range(n):
        length = int(rng.integers(16, max_len + 1))
        if pos + length > len(stream):
            pos = 0
        ids = [1, *stream[pos : pos + length - 1].tolist()]
        pos += length - 1
        cut = int(round(0.4 * length))
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows, tokenizer.get_vocab_size()


def build_llama(vocab_size: int, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS))
    return get_peft_model(LlamaForCausalLM(config), lora)


def llava_rows(n: int):
    """``n`` easy-VQA rows for the demo's tiny LLaVA (pixel values materialised), the model, and the pad id."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from icons_hf.data import prepare_llava_dataset
    from icons_hf.testing import build_tiny_llava, build_tokenizer, easy_vqa_records, image_processor

    records, folder = easy_vqa_records("train")
    records = records[:n]
    tokenizer = build_tokenizer([t["value"] for r in records for t in r["conversations"]])
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    lazy = prepare_llava_dataset(records, tokenizer, image_processor=image_processor(), image_folder=folder,
                                 image_token_id=image_token_id, num_image_tokens=16)
    columns = {"input_ids": [], "labels": [], "pixel_values": []}
    for start in range(0, len(lazy), 256):
        part = lazy[start : start + 256]
        for key in columns:
            columns[key].extend(np.asarray(v, dtype=np.float32) if key == "pixel_values" else v for v in part[key])
    model = build_tiny_llava(len(tokenizer), image_token_id, tokenizer.pad_token_id, seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, modules_to_save=["multi_modal_projector"],
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    return Dataset.from_dict(columns), get_peft_model(model, lora), tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------------- methods


def make_batches(dataset, order, batch_size, pad_token_id):
    from icons_hf.gradients.batching import fetch_rows
    from icons_hf.gradients.extractor import collate_rows

    return [collate_rows(fetch_rows(dataset, order[i : i + batch_size]), pad_token_id)
            for i in range(0, len(order), batch_size)]


def train_steps(model, optimizer, batches) -> None:
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def extract(model, dataset, out_dir, *, projection, dim, batch_size, pad_token_id, feature="adam", optimizer=None):
    from icons_hf import compute_gradients

    shutil.rmtree(out_dir, ignore_errors=True)
    with Clock() as clock:
        compute_gradients(model, dataset, output_dir=out_dir, feature=feature, optimizer_state=optimizer,
                          projection=projection, dim=dim, batch_size=batch_size, pad_token_id=pad_token_id,
                          show_progress=False)
    return clock.elapsed


def stored_features(path) -> np.ndarray:
    from icons_hf import load_gradients

    table = load_gradients(path).with_format("numpy")[:]
    return np.asarray(table["features"], dtype=np.float64)


def reference_recipe(model, dataset, rows, state, dim: int, seed: int = 0, block: int = 512) -> np.ndarray:
    """Batch size 1, full concatenated LoRA gradient, LESS Adam map, dense Rademacher blocks regenerated per call."""
    import torch

    model.eval()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = torch.cat([state.moments[n]["exp_avg"].reshape(-1).float() for n in names])
    v = torch.cat([state.moments[n]["exp_avg_sq"].reshape(-1).float() for n in names])
    (b1, b2), eps = state.betas, state.eps
    out = []
    for i in rows:
        row = dataset[int(i)]
        inputs = {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]])}
        if "pixel_values" in row:
            inputs["pixel_values"] = torch.tensor(np.asarray(row["pixel_values"], dtype=np.float32))[None]
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        feature = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)
        projected = torch.empty(dim)
        for lo in range(0, dim, block):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + lo)
            matrix = torch.randint(0, 2, (g.numel(), min(block, dim - lo)), generator=gen, dtype=torch.int8)
            projected[lo : lo + block] = feature @ (matrix.float() * 2 - 1) / dim**0.5
        out.append(projected.numpy())
    model.zero_grad(set_to_none=True)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------- runs


def run_model(name, dataset, model, pad_token_id, args, workdir) -> dict:
    import torch

    from icons_hf.gradients import AdamState
    from icons_hf.gradients.batching import plan_batches, row_lengths


    n_warm = args.warmup_steps * args.batch_size
    warm = dataset.select(range(n_warm))
    pool = dataset.select(range(n_warm, n_warm + args.rows))
    head = pool.select(range(args.batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    train_steps(model, optimizer, make_batches(warm, rng.permutation(n_warm), args.batch_size, pad_token_id))
    lengths = row_lengths(pool)
    random_batches = make_batches(pool, rng.permutation(len(pool)), args.batch_size, pad_token_id)
    grouped = np.concatenate(plan_batches(np.arange(len(pool)), lengths, args.batch_size))
    grouped_batches = make_batches(pool, grouped, args.batch_size, pad_token_id)
    tokens = int(lengths.sum())
    padded = {k: sum(int(b["input_ids"].numel()) for b in bs) for k, bs in
              (("random", random_batches), ("grouped", grouped_batches))}
    numel = sum(p.numel() for p in params)
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {numel} trainable (LoRA); "
          f"{len(pool)} rows, {tokens} tokens ({tokens / len(pool):.0f}/row); padded tokens: random batches "
          f"{padded['random']}, length-grouped {padded['grouped']}; batch size {args.batch_size}")

    results: dict = {}

    def record(key, elapsed, rows, mem, setup=None):
        res = results.setdefault(key, {"rows": rows, "examples_per_s": 0.0, "examples_per_cpu_s": 0.0})
        res["examples_per_s"] = max(res["examples_per_s"], rows / elapsed[0])
        res["examples_per_cpu_s"] = max(res["examples_per_cpu_s"], rows / elapsed[1])
        if setup is not None:
            res["setup_s"] = min(setup, res.get("setup_s", setup))
        res["peak_rss_mib"] = max(mem, res.get("peak_rss_mib", 0.0))

    train_steps(model, optimizer, random_batches[:1])  # warm
    for round_no in range(args.rounds):
        # Training steps change the weights; extraction runs on the warmed-up model of each round.
        for key, batches in (("train", random_batches), ("train-grouped", grouped_batches)):
            with PeakRSS() as mem, Clock() as clock:
                train_steps(model, optimizer, batches)
            record(key, clock.elapsed, len(pool), mem.mib)
        for projection in args.projections:
            if projection == "rademacher" and round_no != args.rounds - 1:
                continue  # slow and memory-bound: timed once, in the last round (see projection_quality)
            out = os.path.join(workdir, f"{name}-{projection}")
            with PeakRSS() as mem:
                small = extract(model, head, out + "-head", projection=projection, dim=args.dim,
                                batch_size=args.batch_size, pad_token_id=pad_token_id, optimizer=optimizer)
                full = extract(model, pool, out, projection=projection, dim=args.dim, batch_size=args.batch_size,
                               pad_token_id=pad_token_id, optimizer=optimizer)
            marginal = [(f - s) / (len(pool) - len(head)) for f, s in zip(full, small, strict=True)]
            record(f"icons/{projection}", [m * len(pool) for m in marginal], len(pool), mem.mib,
                   setup=max(0.0, small[0] - marginal[0] * len(head)))
        if round_no == args.rounds - 1 and args.reference_rows:
            state = AdamState.from_optimizer(optimizer, model)
            with PeakRSS() as mem, Clock() as clock:
                reference_recipe(model, pool, range(args.reference_rows), state, args.dim)
            record("reference", clock.elapsed, args.reference_rows, mem.mib)

    basis = "examples_per_cpu_s" if args.clock == "cpu" else "examples_per_s"
    limit, limit_grouped = results["train"][basis], results["train-grouped"][basis]
    reference = results.get("reference", {}).get(basis)
    print(f"{'method':<20}{'ex/s':>8}{'ex/CPU-s':>10}{'vs train':>10}{'vs grouped':>12}{'vs reference':>14}"
          f"{'setup s':>9}{'peak MiB':>10}")
    for key, res in results.items():
        rate = res[basis]
        res["vs_train"], res["vs_train_grouped"] = rate / limit, rate / limit_grouped
        if reference:
            res["vs_reference"] = rate / reference
        ref_txt = f"{rate / reference:>13.1f}x" if reference else f"{'':>14}"
        setup = f"{res['setup_s']:>9.1f}" if "setup_s" in res else f"{'':>9}"
        print(f"{key:<20}{res['examples_per_s']:>8.1f}{res['examples_per_cpu_s']:>10.1f}{rate / limit:>9.2f}x"
              f"{rate / limit_grouped:>11.2f}x{ref_txt}{setup}{res['peak_rss_mib']:>10.0f}")
    return results, pool, optimizer


def projection_quality(name, pool, model, pad_token_id, args, workdir) -> dict:
    """Spearman correlation of projected vs exact pairwise cosines on the pool rows: Adam-LESS features from the
    stores of the last timed round (same weights and optimizer state for every projection), SGD features computed
    here on the first ``--quality-rows`` rows."""
    out: dict = {}
    sgd_pool = pool.select(range(min(len(pool), args.quality_rows)))
    projections = ("identity", *[p for p in args.projections if p != "identity"])
    for feature in ("adam", "sgd"):
        exact = None
        for projection in projections:
            path = os.path.join(workdir, f"{name}-{projection}")
            if feature == "sgd":
                path = os.path.join(workdir, f"{name}-sgd-{projection}")
                extract(model, sgd_pool, path, projection=projection, dim=args.dim, batch_size=args.batch_size,
                        pad_token_id=pad_token_id, feature="sgd")
            cos = pair_cosines(stored_features(path))
            if projection == "identity":
                exact = cos
                continue
            out[f"{feature}/{projection}"] = {
                "spearman": spearman(cos, exact), "pearson": float(np.corrcoef(cos, exact)[0, 1]),
                "mean_abs_error": float(np.abs(cos - exact).mean()), "pairs": len(cos),
                "exact_cosine_range": [float(exact.min()), float(exact.max())],
            }
    print(f"projection accuracy at dim {args.dim} (rank correlation of projected vs exact cosine similarities; "
          f"adam: {len(pool)} rows, sgd: {len(sgd_pool)} rows, all pairs)")
    for key, res in out.items():
        print(f"  {key:<24} spearman {res['spearman']:.4f}   pearson {res['pearson']:.4f}   "
              f"mean |error| {res['mean_abs_error']:.4f}   exact cosines in [{res['exact_cosine_range'][0]:.2f}, "
              f"{res['exact_cosine_range'][1]:.2f}]")
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,llava", help="comma-separated: llama, llava")
    parser.add_argument("--rows", type=int, default=96, help="pool rows timed per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--projections", default="countsketch,rademacher,identity")
    parser.add_argument("--reference-rows", type=int, default=2, help="rows for the batch-size-1 reference recipe")
    parser.add_argument("--warmup-steps", type=int, default=15, help="LoRA training steps before measuring")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the timed methods (rademacher and reference: once), keep each one's best")
    parser.add_argument("--quality-rows", type=int, default=48, help="rows for projection accuracy (llama; 0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="basis of the ratios: process CPU time (steady on a shared machine) or wall time")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("icons_hf").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.projections = [p for p in args.projections.split(",") if p]
    started = time.perf_counter()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; dim {args.dim}; "
          f"ratios ({args.clock} time): b/a = 'vs train' (random batches) and 'vs grouped' (same length-grouped "
          "batches), b/c = 'vs reference'")
    report: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "dim": args.dim, "models": {}}
    workdir = tempfile.mkdtemp(prefix="icons-extract-")
    try:
        for name in [m for m in args.models.split(",") if m]:
            total = args.warmup_steps * args.batch_size + args.rows
            if name == "llama":
                rows, vocab = text_rows(total)
                from datasets import Dataset

                dataset, model, pad = Dataset.from_list(rows), build_llama(vocab), 0
            elif name == "llava":
                dataset, model, pad = llava_rows(total)
            else:
                raise SystemExit(f"unknown model {name!r}; choose llama and/or llava")
            speed, pool, _ = run_model(name, dataset, model, pad, args, workdir)
            entry = {"speed": speed}
            if name == "llama" and args.quality_rows and "identity" in args.projections:
                entry["quality"] = projection_quality(name, pool, model, pad, args, workdir)
            report["models"][name] = entry
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - started
    print(f"\n# total {report['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
