"""Jobs of the many-task replica: a base model per seed, a pool with its warmup features and every rule's
selections per (seed, pool), and one stage-two training per (seed, pool, rule, fraction). Every job writes one
JSON file when it finishes and is skipped when that file exists (the run resumes)."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import torch
from many_model import add_lora, as_dataset, evaluate, new_model, tensorize, test_sets, train_fixed_steps
from many_rules import select_rows
from many_tasks import (
    OFF_TASK,
    POOLS,
    SUBTASKS,
    TARGETS,
    balanced_questions,
    build_pool,
    fact_table,
    leaf_tasks,
    question,
)
from replica_common import JobCache

logger = logging.getLogger("replica_many")
HARMFUL = ("wrong", "noise", "off_task")
KINDS = ("single", "generalist", "near_duplicate", "wrong", "noise", "off_task")
# Leaves with a large question space: their validation questions are kept out of the pool.
LARGE_SPACE = ("count", "last", "max", "sentiment", "yesno/contains")
# A question's first character names its task (many_tasks.question); E, I and G are yesno's subtasks.
TAG_TASK = {"A": "add", "C": "compare", "K": "count", "R": "last", "F": "fact", "M": "max", "P": "sentiment",
            "E": "yesno", "I": "yesno", "G": "yesno"}


def write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def run_key(rule: str, fraction: float) -> str:
    return f"{rule}@{fraction:g}"


class Material:
    """Per seed: the fact table, validation questions (distinct, answer-balanced) and test questions."""

    def __init__(self, seed: int, validation_per_task: int, test_per_leaf: int):
        self.seed = seed
        self.facts = fact_table(seed)
        rng = np.random.default_rng([seed, 21])
        self.validation = {}
        for task in TARGETS:
            if task in SUBTASKS:
                per = max(2, validation_per_task // len(SUBTASKS[task]))
                self.validation[task] = {leaf.split("/")[1]: balanced_questions(leaf, per, rng, self.facts,
                                                                              distinct=True, allow_fewer=True)
                                         for leaf in leaf_tasks(task)}
            else:
                self.validation[task] = balanced_questions(task, validation_per_task, rng, self.facts, distinct=True,
                                                            allow_fewer=True)
        test_rng = np.random.default_rng([seed, 22])
        self.tests = {leaf: balanced_questions(leaf, test_per_leaf, test_rng, self.facts, distinct=False)
                      for task in TARGETS for leaf in leaf_tasks(task)}

    def excluded(self) -> set[str]:
        out = set()
        for task, spec in self.validation.items():
            pairs = [p for qa in spec.values() for p in qa] if isinstance(spec, dict) else spec
            out |= {q for q, _ in pairs if task in LARGE_SPACE or f"{task}/{q[0]}" in LARGE_SPACE}
        return out

    def validation_datasets(self) -> dict:
        def ds(pairs):
            return as_dataset([{"segments": [p]} for p in pairs])

        return {t: ({s: ds(p) for s, p in v.items()} if isinstance(v, dict) else ds(v))
                for t, v in self.validation.items()}

    def base_corpus(self, size: int) -> list[dict]:
        """Clean one-question rows of every task but the fact table (unknown to the base model), off-task ones too."""
        rng = np.random.default_rng([self.seed, 23])
        leaves = [leaf for t in TARGETS if t != "fact" for leaf in leaf_tasks(t)] + list(OFF_TASK)
        return [{"segments": [question(leaves[int(rng.integers(len(leaves)))], rng, self.facts)]} for _ in range(size)]


def segment_task(segment_question: str) -> str | None:
    """The target task a question segment asks (by its tag), None for an off-task question."""
    return TAG_TASK.get(segment_question[0])


def composition(rows: list[dict], positions: np.ndarray) -> dict:
    """Counts of the hidden kinds of the rows at ``positions``, their harmful share, single-task rows per task,
    ``multi_task`` (rows with questions of two or more target tasks, near-duplicates of generalist rows included)
    and ``rows_by_task`` (rows holding a question of the task, a multi-task row counted for each of its tasks)."""
    kinds = [rows[int(i)]["kind"] for i in positions]
    out = {k: kinds.count(k) for k in KINDS}
    out["rows"] = len(kinds)
    out["harmful_share"] = sum(out[k] for k in HARMFUL) / max(1, len(kinds))
    tasks = [rows[int(i)]["task"] for i in positions if rows[int(i)]["kind"] == "single"]
    out["single_by_task"] = {t: tasks.count(t) for t in TARGETS}
    asked = [{segment_task(q) for q, _ in rows[int(i)]["segments"]} - {None} for i in positions]
    out["multi_task"] = sum(len(a) >= 2 for a in asked)
    out["rows_by_task"] = {t: sum(t in a for a in asked) for t in TARGETS}
    return out


def kmeans_features(train_store: str) -> np.ndarray:
    from icons_hf import load_gradients

    store = load_gradients(train_store).with_format("numpy")
    x = np.asarray(store["features"], dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def warmup_features(model, pool_ds, validation: dict, *, out_dir: str, seed: int, args, extraction_batch_size: int = 64,
                    scheduler: str = "linear", logging_steps: int | None = None) -> tuple[list[str], dict, dict]:
    """LoRA warmup with ``transformers.Trainer`` on a random ``warmup_fraction`` of the pool; ``IconsCallback``
    (library defaults but ``dim`` and ``extraction_batch_size``) writes the features at each of ``checkpoints``
    saves. ``logging_steps`` defaults to a quarter of the warmup."""
    from transformers import Trainer, TrainingArguments

    from icons_hf import IconsCallback
    from icons_hf.data import IconsCollator

    rng = np.random.default_rng([seed, 4])
    n = len(pool_ds)
    warm_ds = pool_ds.select(np.sort(rng.choice(n, max(1, round(args.warmup_fraction * n)), replace=False)))
    callback = IconsCallback(pool_ds, validation, os.path.join(out_dir, "features"), dim=args.dim, seed=seed,
                             batch_size=extraction_batch_size)
    total = math.ceil(len(warm_ds) / args.warmup_batch_size) * args.warmup_epochs
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, "warmup"), per_device_train_batch_size=args.warmup_batch_size,
        num_train_epochs=args.warmup_epochs, learning_rate=args.learning_rate, lr_scheduler_type=scheduler,
        warmup_steps=max(1, total // 10), save_strategy="steps", save_steps=max(1, total // args.checkpoints),
        save_only_model=True, logging_steps=logging_steps or max(1, total // 4), report_to="none", use_cpu=True,
        remove_unused_columns=False, seed=seed, disable_tqdm=True, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=warm_ds, data_collator=IconsCollator(0),
                      callbacks=[callback])
    trainer.train()
    train, tasks = callback.stores()
    return train, tasks, {"warmup_rows": len(warm_ds), "warmup_steps": int(trainer.state.global_step)}


class Worker(JobCache):
    """Runs jobs in one process; caches the material, base states and pools of the seeds it has seen."""

    def __init__(self, args: dict):
        super().__init__()
        self.args = type("Args", (), args)

    def material(self, seed: int) -> Material:
        a = self.args
        return self.cached(("material", seed), lambda: Material(seed, a.validation_per_task, a.test_per_leaf))

    def tests(self, seed: int) -> dict:
        return self.cached(("tests", seed), lambda: test_sets(self.material(seed).tests))

    def folder(self, seed: int, pool: str | None = None) -> str:
        return os.path.join(self.args.output_dir, f"seed{seed}", *([pool] if pool else []))

    def base_state(self, seed: int) -> dict:
        from safetensors.torch import load_file

        return self.cached(("base", seed), lambda: load_file(os.path.join(self.folder(seed), "base.safetensors")))

    def stage_two_model(self, seed: int):
        model = new_model(seed, hidden=self.args.hidden)
        model.load_state_dict(self.base_state(seed))
        return add_lora(model, seed, self.args.lora_r)

    def pool(self, seed: int, name: str) -> list[dict]:
        def build():
            rows = read_json(os.path.join(self.folder(seed, name), "pool.json"))
            return rows, tensorize(rows)

        return self.cached(("pool", seed, name), build)

    def run(self, job: dict) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        if job["kind"] == "base":
            out = self.base(job["seed"])
        elif job["kind"] == "prep":
            out = self.prep(job["seed"], job["pool"], job["runs"])
        elif job["kind"] == "train":
            out = self.train(job["seed"], job["pool"], job["rule"], job["fraction"])
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}; known: base, prep, train.")
        return {**out, "job_wall_s": time.perf_counter() - started, "job_cpu_s": time.process_time() - cpu}

    def base(self, seed: int) -> dict:
        from safetensors.torch import save_file

        done = os.path.join(self.folder(seed), "base.json")
        if os.path.isfile(done):
            return {**read_json(done), "cached": True}
        a = self.args
        model = new_model(seed, hidden=a.hidden)
        corpus = tensorize(self.material(seed).base_corpus(a.base_rows))
        loss = train_fixed_steps(model, corpus, steps=a.base_steps, batch_size=64, lr=a.base_learning_rate, seed=seed)
        os.makedirs(self.folder(seed), exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(self.folder(seed), "base.safetensors"))
        info = {"loss": loss, "accuracy": evaluate(model, self.tests(seed))}
        write_json(done, info)
        return info

    def prep(self, seed: int, name: str, runs: list) -> dict:
        from icons_hf import compute_influence

        folder = self.folder(seed, name)
        done = os.path.join(folder, "selections.json")
        if os.path.isfile(done) and all(run_key(r, f) in read_json(done)["selections"] for r, f in runs if r != "full"):
            return {"cached": True}
        a, material = self.args, self.material(seed)
        rows = build_pool(POOLS[name], a.pool_size, seed, material.facts, material.excluded())
        write_json(os.path.join(folder, "pool.json"), rows)
        t0 = time.process_time()
        train, tasks, info = warmup_features(self.stage_two_model(seed), as_dataset(rows),
                                             material.validation_datasets(), out_dir=folder, seed=seed, args=a)
        info["features_cpu_s"] = time.process_time() - t0
        balanced = compute_influence(train, tasks)
        mean = compute_influence(train, tasks, preset="paper")  # the mean-cosine specialist
        features = kmeans_features(train[-1])
        selections, comps = {}, {}
        for rule, fraction in runs:
            if rule == "full":
                continue
            chosen = select_rows(rule, fraction, balanced=balanced, mean=mean, features=features, seed=seed)
            selections[run_key(rule, fraction)] = chosen.tolist()
            comps[run_key(rule, fraction)] = composition(rows, chosen)
        comps["full@1"] = composition(rows, np.arange(len(rows)))
        write_json(done, {"selections": selections, "composition": comps, "info": info})
        return info

    def train(self, seed: int, name: str, rule: str, fraction: float) -> dict:
        done = os.path.join(self.folder(seed, name), "runs", run_key(rule, fraction) + ".json")
        if os.path.isfile(done):
            return {**read_json(done), "cached": True}
        a = self.args
        rows, data = self.pool(seed, name)
        if rule == "full":
            positions = np.arange(len(rows))
        else:
            selections = read_json(os.path.join(self.folder(seed, name), "selections.json"))["selections"]
            positions = np.asarray(selections[run_key(rule, fraction)])
        subset = {k: v[torch.as_tensor(positions)] for k, v in data.items()}
        model = self.stage_two_model(seed)
        loss = train_fixed_steps(model, subset, steps=a.train_steps, batch_size=a.batch_size, lr=a.learning_rate,
                                 seed=seed)
        result = {"loss": loss, "rows": int(len(positions)), "accuracy": evaluate(model, self.tests(seed))}
        write_json(done, result)
        return result

