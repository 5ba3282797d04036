"""Jobs of the real-model replica: the base model (once), a pool with its warmup features and every rule's
selections per (seed, pool), and one stage-two training per (seed, pool, rule). Every job writes one JSON file
when it finishes and is skipped when that file exists (the run resumes)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from many_harness import read_json, warmup_features, write_json
from real_model import as_dataset, exact_match, load_base, prepare_base, tensorize, top_model, train_fixed_steps
from real_rules import select_rows
from real_tasks import HARMFUL, KINDS, LARGE_SPACE, SUBTASKS, TARGETS, balanced_questions, build_pool, leaf_tasks
from replica_common import JobCache

logger = logging.getLogger("replica_real")


class Material:
    """Per seed: validation questions (distinct, answer-balanced; a task with subtasks split over them) and
    answer-balanced test questions per leaf task; the large-space leaves' questions are kept out of the pool."""

    def __init__(self, seed: int, validation_per_task: int, test_per_leaf: int):
        rng = np.random.default_rng([seed, 41])
        self.validation = {}
        for task in TARGETS:
            if task in SUBTASKS:
                per = max(2, validation_per_task // len(SUBTASKS[task]))
                self.validation[task] = {leaf.split("/")[1]: balanced_questions(leaf, per, rng)
                                         for leaf in leaf_tasks(task)}
            else:
                self.validation[task] = balanced_questions(task, validation_per_task, rng)
        seen = {q for spec in self.validation.values()
                for pairs in (spec.values() if isinstance(spec, dict) else [spec]) for q, _ in pairs}
        test_rng = np.random.default_rng([seed, 42])
        self.tests = {leaf: balanced_questions(leaf, test_per_leaf, test_rng,
                                               exclude=seen if leaf in LARGE_SPACE else set())
                      for task in TARGETS for leaf in leaf_tasks(task)}

    def excluded(self) -> set[str]:
        out = set()
        for task, spec in self.validation.items():
            for leaf, pairs in (spec.items() if isinstance(spec, dict) else [(task, spec)]):
                full = leaf if leaf == task else f"{task}/{leaf}"
                if full in LARGE_SPACE:
                    out |= {q for q, _ in pairs}
        return out | {q for leaf, pairs in self.tests.items() if leaf in LARGE_SPACE for q, _ in pairs}

    def validation_rows(self) -> dict:
        return {t: ({s: chat_rows(p) for s, p in v.items()} if isinstance(v, dict) else chat_rows(v))
                for t, v in self.validation.items()}

    def test_rows(self) -> tuple[list[str], list[dict]]:
        leaves = [leaf for leaf, pairs in self.tests.items() for _ in pairs]
        return leaves, chat_rows([p for pairs in self.tests.values() for p in pairs])


def chat_rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def task_accuracy(leaf_accuracy: dict) -> dict:
    """Per target task: its leaf's accuracy, or the mean over its subtasks (as MME's score sums them)."""
    return {t: float(np.mean([leaf_accuracy[leaf] for leaf in leaf_tasks(t)])) for t in TARGETS}


def composition(rows: list[dict], positions) -> dict:
    """What a selection holds: rows per kind, harmful and conversation shares, answers per task (clean rows)."""
    kinds = [rows[int(i)]["kind"] for i in positions]
    out = {k: kinds.count(k) for k in KINDS}
    out["rows"] = len(kinds)
    out["harmful_share"] = sum(out[k] for k in HARMFUL) / max(1, len(kinds))
    out["conversation_share"] = out["conversation"] / max(1, len(kinds))
    answers = [t for i in positions if rows[int(i)]["kind"] not in HARMFUL for t in rows[int(i)]["tasks"]]
    out["answers_by_task"] = {t: answers.count(t) for t in TARGETS}
    return out


def score_diagnostics(rows: list[dict], tables: dict) -> dict:
    """Per specialist and task: the mean score of the task's clean single rows, wrong-answer rows and the
    conversation rows that ask it, and the Spearman correlation of the score with the row's supervised length."""
    from icons_hf.ranks import percentile_ranks

    out = {}
    lengths = np.asarray([sum(len(m["content"]) for m in r["messages"] if m["role"] == "assistant") for r in rows])
    length_ranks = percentile_ranks(lengths)
    for name, table in tables.items():
        out[name] = {}
        for task in TARGETS:
            score = np.asarray(table[f"influence_{task}"], dtype=np.float64)
            groups = {"clean": [i for i, r in enumerate(rows) if r["kind"] in ("single", "near_duplicate")
                                and r["tasks"] == [task]],
                      "wrong": [i for i, r in enumerate(rows) if r["kind"] == "wrong" and r["tasks"] == [task]],
                      "conversation": [i for i, r in enumerate(rows) if r["kind"] == "conversation"
                                       and task in r["tasks"]]}
            entry = {g: float(score[idx].mean()) if idx else None for g, idx in groups.items()}
            ranks = percentile_ranks(score)
            entry["pct_rank"] = {g: float(ranks[idx].mean()) if idx else None for g, idx in groups.items()}
            entry["spearman_length"] = float(np.corrcoef(ranks, length_ranks)[0, 1])
            out[name][task] = entry
    return out


class Worker(JobCache):
    """Runs jobs in one process; caches the base model, material and pools it has seen."""

    def __init__(self, args: dict):
        super().__init__()
        self.args = type("Args", (), args)

    @property
    def base_folder(self) -> str:
        return os.path.join(self.args.output_dir, "smollm2")

    def base(self):
        return self.cached("base", lambda: load_base(self.base_folder))

    def dataset(self, rows: list[dict]):
        model, tokenizer = self.base()
        return as_dataset(rows, tokenizer, model, model.config.num_hidden_layers - self.args.top)

    def tests(self, seed: int):
        def build():
            leaves, rows = self.material(seed).test_rows()
            return leaves, tensorize(self.dataset(rows), self.base()[1].pad_token_id)

        return self.cached(("tests", seed), build)

    def material(self, seed: int) -> Material:
        a = self.args
        return self.cached(("material", seed), lambda: Material(seed, a.validation_per_task, a.test_per_leaf))

    def folder(self, seed: int, pool: str) -> str:
        return os.path.join(self.args.output_dir, f"seed{seed}", pool)

    def fresh_model(self, seed: int):
        return top_model(self.base()[0], self.args.top, seed, self.args.lora_r)

    def run(self, job: dict) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        if job["kind"] == "base":
            out = self.prepare()
        elif job["kind"] == "prep":
            out = self.prep(job["seed"], job["pool"], job["rules"])
        elif job["kind"] == "train":
            out = self.train(job["seed"], job["pool"], job["rule"])
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}; known: base, prep, train.")
        return {**out, "job_wall_s": time.perf_counter() - started, "job_cpu_s": time.process_time() - cpu}

    def prepare(self) -> dict:
        done = os.path.join(self.base_folder, "base.json")
        if os.path.isfile(done):
            return {**read_json(done), "cached": True}
        prepare_base(self.base_folder)
        write_json(done, {"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"})
        return {}

    def prep(self, seed: int, name: str, rules: list[str]) -> dict:
        from icons_hf import compute_influence

        folder = self.folder(seed, name)
        done = os.path.join(folder, "selections.json")
        if os.path.isfile(done):
            saved = read_json(done)
            missing = [r for r in rules if r != "full" and r not in saved["selections"]]
            if not missing:
                return {"cached": True}
            return self.add_rules(seed, name, saved, missing)
        a, material = self.args, self.material(seed)
        rows = build_pool(name, a.pool_size, seed, material.excluded())
        write_json(os.path.join(folder, "pool.json"), rows)
        t0 = time.process_time()
        pool_ds = self.dataset(rows)
        pool_ds.save_to_disk(os.path.join(folder, "pool_states"))
        validation = {t: ({s: self.dataset(r) for s, r in v.items()} if isinstance(v, dict) else self.dataset(v))
                      for t, v in material.validation_rows().items()}
        states_cpu = time.process_time() - t0
        # One checkpoint at the warmup's end: a constant rate, so its learning-rate weight is not zero.
        train, tasks, info = warmup_features(
            self.fresh_model(seed), pool_ds, validation, out_dir=folder, seed=seed, args=a, extraction_batch_size=16,
            scheduler="constant_with_warmup" if a.checkpoints == 1 else "linear", logging_steps=1)
        info["prefix_states_cpu_s"] = states_cpu
        info["features_cpu_s"] = time.process_time() - t0 - states_cpu
        balanced = compute_influence(train, tasks)
        mean = compute_influence(train, tasks, preset="paper")  # the mean-cosine specialist
        selections, comps = {}, {}
        for rule in rules:
            if rule == "full":
                continue
            chosen = select_rows(rule, a.fraction, balanced=balanced, mean=mean, seed=seed)
            selections[rule] = chosen.tolist()
            comps[rule] = composition(rows, chosen)
        comps["full"] = composition(rows, np.arange(len(rows)))
        info["scores"] = score_diagnostics(rows, {"balanced": balanced, "mean": mean})
        write_json(done, {"selections": selections, "composition": comps, "info": info})
        return info

    def add_rules(self, seed: int, name: str, saved: dict, rules: list[str]) -> dict:
        """Selections of rules added after a pool's features were computed: from its stored features (a rule is a
        choice over the same scores), the other rules' selections unchanged."""
        from icons_hf import compute_influence
        from icons_hf.checkpoints import load_run

        folder = self.folder(seed, name)
        rows = read_json(os.path.join(folder, "pool.json"))
        train, tasks = load_run(os.path.join(folder, "features"))
        balanced = compute_influence(train, tasks)
        mean = compute_influence(train, tasks, preset="paper")
        for rule in rules:
            chosen = select_rows(rule, self.args.fraction, balanced=balanced, mean=mean, seed=seed)
            saved["selections"][rule] = chosen.tolist()
            saved["composition"][rule] = composition(rows, chosen)
        write_json(os.path.join(folder, "selections.json"), saved)
        return {"added_rules": rules}

    def train(self, seed: int, name: str, rule: str) -> dict:
        done = os.path.join(self.folder(seed, name), "runs", rule + ".json")
        if os.path.isfile(done):
            return {**read_json(done), "cached": True}
        a = self.args
        rows, data = self.cached(("pool", seed, name), lambda: self._pool_tensors(seed, name))
        if rule == "full":
            positions = np.arange(len(rows))
        else:
            positions = np.asarray(read_json(os.path.join(self.folder(seed, name), "selections.json"))
                                   ["selections"][rule])
        subset = {k: v[torch.as_tensor(positions)] for k, v in data.items()}
        model = self.fresh_model(seed)
        loss = train_fixed_steps(model, subset, steps=a.train_steps, batch_size=a.batch_size, lr=a.learning_rate,
                                 seed=seed)
        leaves = exact_match(model, self.tests(seed)[1], self.tests(seed)[0])
        result = {"loss": loss, "rows": int(len(positions)), "leaf_accuracy": leaves,
                  "accuracy": task_accuracy(leaves)}
        write_json(done, result)
        return result

    def _pool_tensors(self, seed: int, name: str):
        from datasets import load_from_disk

        folder = self.folder(seed, name)
        rows = read_json(os.path.join(folder, "pool.json"))
        return rows, tensorize(load_from_disk(os.path.join(folder, "pool_states")), self.base()[1].pad_token_id)

