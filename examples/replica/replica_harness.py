"""The replica's material and stages: easy-VQA data, corrupted pools, the base model, warmup + features,
selections, and the fixed-budget training run that judges a selection.

Everything here is a pure function of (arguments, seed, pool name): any process can rebuild any piece, so the
driver (``replica.py``) can hand jobs to worker processes or to the ranks of an ``accelerate launch``.
Hidden row kinds (clean, wrong answer, off-task, unreadable image) are kept next to the pool for the report
only; no selection ever sees them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from replica_common import JobCache, fixed_step_training, linear_schedule

from icons_hf.ranks import column_arrays
from icons_hf.testing import (
    COLORS,
    SHAPES,
    answer_balanced,
    answer_task,
    build_tiny_llava,
    build_tokenizer,
    easy_vqa_records,
    image_processor,
)

logger = logging.getLogger(__name__)

ANSWERS = {"shape": list(SHAPES), "color": list(COLORS), "yesno": ["yes", "no"]}
ALL_ANSWERS = [a for task in ("shape", "color", "yesno") for a in ANSWERS[task]]
KINDS = ("clean", "wrong_same", "wrong_other", "off_task", "unreadable")
KIND_HELP = {
    "clean": "the easy-VQA row as is",
    "wrong_same": "answer replaced by another answer of the same question type",
    "wrong_other": "answer replaced by an answer of another question type",
    "off_task": "question and answer attached to another image",
    "unreadable": "image replaced by a blank or noise picture",
}
CAPTION_PROMPT = "<image>\ndescribe the image."
NUM_IMAGE_TOKENS = 16  # build_tiny_llava: 32x32 images, 8x8 patches
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass(frozen=True)
class PoolSpec:
    """How a training pool is built: its target tasks and the share of each row kind."""

    name: str
    tasks: tuple[str, ...]
    mix: dict = field(default_factory=dict)
    salt: int = 0

    def counts(self, n: int) -> dict[str, int]:
        shares = np.array([self.mix.get(k, 0.0) for k in KINDS], dtype=np.float64)
        if shares.min() < 0 or not math.isclose(shares.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"pool {self.name!r}: kind shares {self.mix} must be non-negative and sum to 1.")
        raw = shares * n
        counts = np.floor(raw).astype(int)
        for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
            counts[k] += 1
        return dict(zip(KINDS, counts.tolist(), strict=True))


# Both pools were fixed before any selection was measured; they are not tuned to make a method win.
POOLS = {
    "A": PoolSpec("A", ("shape", "color", "yesno"),
                  {"clean": 0.70, "wrong_same": 0.10, "wrong_other": 0.05, "off_task": 0.10, "unreadable": 0.05},
                  salt=1),
    "B": PoolSpec("B", ("shape", "color"),
                  {"clean": 0.55, "wrong_same": 0.05, "wrong_other": 0.15, "off_task": 0.10, "unreadable": 0.15},
                  salt=2),
    # Pool A without harm: the same draw of questions (salt 1), none corrupted, so its task mix is pool A's and
    # the rows that are harmful in A are clean rows of the same tasks here.
    "A-clean": PoolSpec("A-clean", ("shape", "color", "yesno"), {"clean": 1.0}, salt=1),
}


# ----------------------------------------------------------------------------------------------- material


class Material:
    """easy-VQA records, the word-level tokenizer, and a cache of processed images (one per process)."""

    def __init__(self):
        self.train_records, self.train_folder = easy_vqa_records("train")
        self.test_records, self.test_folder = easy_vqa_records("test")
        texts = [t["value"] for r in self.train_records + self.test_records for t in r["conversations"]]
        self.tokenizer = build_tokenizer(texts + [CAPTION_PROMPT, "a shape"])
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.processor = image_processor()
        ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in ALL_ANSWERS]
        bad = [a for a, i in zip(ALL_ANSWERS, ids, strict=True) if len(i) != 1]
        if bad:
            raise ValueError(
                f"answers {bad} are not single tokens of the tokenizer; evaluation needs one token per answer."
            )
        self.answer_ids = torch.tensor([i[0] for i in ids])
        self.image_labels = _image_labels(self.train_records)
        self._rows: dict[str, int] = {}
        self._pixels: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None

    def format_kwargs(self) -> dict:
        return dict(tokenizer=self.tokenizer, image_processor=self.processor, image_token_id=self.image_token_id,
                    num_image_tokens=NUM_IMAGE_TOKENS, system=None)

    def image_path(self, record: dict, folder: str) -> str:
        image = record["image"]
        return image if os.path.isabs(image) else os.path.join(folder, image)

    def image_rows(self, paths) -> torch.Tensor:
        """Row numbers of ``paths`` in :attr:`pixels`, processing the images not seen yet (in one batch)."""
        from PIL import Image

        missing = sorted({p for p in paths if p not in self._rows})
        for start in range(0, len(missing), 512):
            chunk = missing[start : start + 512]
            images = []
            for path in chunk:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            for path, px in zip(chunk, pixels, strict=True):
                self._rows[path] = len(self._pixels)
                self._pixels.append(px)
            self._stacked = None
        return torch.tensor([self._rows[p] for p in paths], dtype=torch.long)

    @property
    def pixels(self) -> torch.Tensor:
        if self._stacked is None or len(self._stacked) != len(self._pixels):
            self._stacked = torch.stack(self._pixels) if self._pixels else torch.zeros(0, 3, 32, 32)
        return self._stacked

    def save_pixels(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({"pixels": self.pixels.contiguous()}, path + ".safetensors")
        with open(path + ".json", "w") as handle:
            json.dump(sorted(self._rows, key=self._rows.get), handle)

    def load_pixels(self, path: str) -> bool:
        from safetensors.torch import load_file

        if not (os.path.isfile(path + ".safetensors") and os.path.isfile(path + ".json")):
            return False
        with open(path + ".json") as handle:
            names = json.load(handle)
        pixels = load_file(path + ".safetensors")["pixels"]
        self._rows = {p: i for i, p in enumerate(names)}
        self._pixels = list(pixels)
        self._stacked = pixels
        return True


def _image_labels(records) -> dict[str, dict[str, str]]:
    """Shape and colour of each image, read off its shape/colour questions (yes/no questions are not needed)."""
    labels: dict[str, dict[str, str]] = {}
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        task = answer_task(answer)
        if task == "yesno":
            continue
        entry = labels.setdefault(r["image"], {})
        entry[task] = answer
        words = set(re.findall(r"\w+", question))
        for s in SHAPES:
            if s in words:
                entry["shape"] = s
        for c in COLORS:
            if c in words:
                entry["color"] = c
    return labels


_MATERIALS: dict[int, Material] = {}


class PixelLookup:
    """``datasets`` transform: ``pixel_values`` from the material's image cache (no image decoding per read).

    It holds only a key into this process's materials: ``datasets`` copies and hashes a dataset's transform on
    every ``select``/``with_format``, which must not copy the whole image cache."""

    def __init__(self, material: Material):
        _MATERIALS[id(material)] = material
        self.key = id(material)

    def __call__(self, batch):
        material = _MATERIALS[self.key]
        pixels = material.pixels[material.image_rows(batch["image"])]
        return {"input_ids": batch["input_ids"], "labels": batch["labels"], "pixel_values": list(pixels)}


def llava_dataset(material: Material, records, folder: str):
    """Records -> an ``icons_hf`` model-input dataset whose images come from the material's cache."""
    from icons_hf.data import prepare_llava_dataset

    dataset = prepare_llava_dataset(records, image_folder=folder, **material.format_kwargs())
    dataset.set_transform(PixelLookup(material))
    material.image_rows(dataset.with_format(None)["image"])
    return dataset


def tensorize(material: Material, dataset) -> dict[str, torch.Tensor]:
    """A formatted dataset as right-padded tensors plus image rows (for the fixed-budget training loop)."""
    table = dataset.with_format(None)
    ids_list = table["input_ids"]
    labels_list = table["labels"]
    width = max(len(x) for x in ids_list)
    n = len(ids_list)
    ids = torch.full((n, width), material.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids_list, labels_list, strict=True)):
        ids[i, : len(a)] = torch.as_tensor(a)
        labels[i, : len(b)] = torch.as_tensor(b)
        mask[i, : len(a)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "image": material.image_rows(table["image"])}


# ------------------------------------------------------------------------------------------ splits and pools


@dataclass
class SeedSplit:
    stage1_images: list[str]
    pool_images: list[str]
    validation: dict[str, list[dict]]
    test: dict[str, list[dict]]


def seed_split(
    material: Material, seed: int, *, stage1_images: int, validation_per_task: int, test_per_task: int
) -> SeedSplit:
    """Train-split images divided into stage-1 images and pool images; per task an answer-balanced validation set
    and a disjoint, answer-balanced test set, both from easy-VQA's test split."""
    rng = np.random.default_rng([seed, 0])
    images = sorted({r["image"] for r in material.train_records})
    rng.shuffle(images)
    if not 0 < stage1_images < len(images):
        raise ValueError(f"stage1_images={stage1_images} must leave pool images out of {len(images)}.")
    validation, test = {}, {}
    for task in ("shape", "color", "yesno"):
        rows = [r for r in material.test_records if answer_task(r["conversations"][1]["value"]) == task]
        val = answer_balanced(list(rows), validation_per_task, rng)
        taken = {r["id"] for r in val}
        test[task] = answer_balanced([r for r in rows if r["id"] not in taken], test_per_task, rng)
        validation[task] = val
    return SeedSplit(images[:stage1_images], images[stage1_images:], validation, test)


def build_pool(material: Material, split: SeedSplit, spec: PoolSpec, *, size: int, seed: int, image_dir: str):
    """``size`` pool rows (LLaVA records) drawn from the questions on pool images, corrupted per ``spec.mix``.

    Returns ``(records, kinds)``; ``kinds[i]`` is row ``i``'s hidden kind (for reports only).
    """
    rng = np.random.default_rng([seed, spec.salt, 1])
    pool_images = set(split.pool_images)
    candidates = [r for r in material.train_records if r["image"] in pool_images]
    if size > len(candidates):
        raise ValueError(f"pool_size={size} exceeds the {len(candidates)} questions on pool images.")
    picked = [candidates[i] for i in np.sort(rng.choice(len(candidates), size, replace=False))]
    kinds = np.array([k for k, n in spec.counts(size).items() for _ in range(n)], dtype=object)
    rng.shuffle(kinds)
    os.makedirs(image_dir, exist_ok=True)
    image_list = sorted(pool_images)
    records = []
    for i, (row, kind) in enumerate(zip(picked, kinds, strict=True)):
        question, answer = row["conversations"][0]["value"], row["conversations"][1]["value"]
        image = os.path.join(material.train_folder, row["image"])
        task = answer_task(answer)
        if kind == "wrong_same":
            answer = str(rng.choice([a for a in ANSWERS[task] if a != answer]))
        elif kind == "wrong_other":
            answer = str(rng.choice([a for t, answers in ANSWERS.items() if t != task for a in answers]))
        elif kind == "off_task":
            other = row["image"]
            while other == row["image"]:
                other = image_list[int(rng.integers(len(image_list)))]
            image = os.path.join(material.train_folder, other)
        elif kind == "unreadable":
            image = os.path.join(image_dir, f"{spec.name}-{i:05d}.png")
            _unreadable_image(rng, image)
        records.append({
            "id": f"replica-{spec.name}-s{seed}-{i:05d}",
            "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        })
    return records, [str(k) for k in kinds]


def _unreadable_image(rng: np.random.Generator, path: str) -> None:
    from PIL import Image

    if rng.random() < 0.5:
        pixels = np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (64, 64, 3))
    else:
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def row_task(record: dict) -> str:
    return answer_task(record["conversations"][1]["value"])


def question_type(question: str) -> str:
    """The task a question asks about, from its wording (for composition reports)."""
    q = question.replace("<image>", "").strip().lower()
    if q.startswith(("is ", "does ")):
        return "yesno"
    if "color" in q or "colour" in q:
        return "color"
    return "shape"


# -------------------------------------------------------------------------------------------------- models


def new_model(material: Material, seed: int):
    tokenizer = material.tokenizer
    return build_tiny_llava(len(tokenizer), material.image_token_id, tokenizer.pad_token_id, seed=seed)


def stage_two_model(material: Material, state: dict, seed: int, r: int, device):
    """The stage-1 model (weights ``state``) with a fresh LoRA adapter on the language model's attention and a
    trainable copy of the projector; the LoRA initialisation depends on ``seed`` only."""
    model = new_model(material, seed)
    model.load_state_dict(state)
    return add_lora(model, seed, r).to(device)


def add_lora(model, seed: int, r: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS,
                        modules_to_save=["multi_modal_projector"])
    return get_peft_model(model, config)


def train_fixed_steps(model, data: dict, pixels: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
                      device) -> float:
    """AdamW with linear warmup/decay for exactly ``steps`` steps; batches of ``batch_size`` rows cycle through
    reshuffled epochs of the rows (the same generator seed for every rule, so only the rows differ; a subset
    smaller than a batch repeats rows within it). Returns the last loss."""

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = {k: data[k][batch].to(device) for k in ("input_ids", "labels", "attention_mask")}
        return model(**inputs, pixel_values=pixels[data["image"][batch]].to(device)).loss

    return fixed_step_training(model, batch_loss, len(data["input_ids"]), steps=steps, batch_size=batch_size, lr=lr,
                               seed=seed)


@torch.no_grad()
def predict_answers(model, data: dict, pixels: torch.Tensor, answer_ids: torch.Tensor, device, batch_size: int = 256):
    """Answer-vocabulary prediction: argmax over the answer tokens of the logits at the answer position."""
    model.eval()
    preds = []
    for start in range(0, len(data["input_ids"]), batch_size):
        sl = slice(start, start + batch_size)
        labels = data["labels"][sl]
        first = (labels != -100).to(torch.int8).argmax(dim=1)
        logits = model(input_ids=data["input_ids"][sl].to(device), attention_mask=data["attention_mask"][sl].to(device),
                       pixel_values=pixels[data["image"][sl]].to(device)).logits
        at = logits[torch.arange(len(first)), (first - 1).to(device)][:, answer_ids.to(device)]
        preds.append(at.argmax(dim=1).cpu())
    return torch.cat(preds)


# ---------------------------------------------------------------------------------------------- stage one


def stage_one(material: Material, split: SeedSplit, *, seed: int, vision_steps: int, stage1_steps: int,
              stage1_questions: int, lr: float, device) -> tuple[dict, dict]:
    """The base model: (a) the vision tower learns shape and colour (a linear probe on its mean patch feature,
    on train-split images), then (b) with the tower frozen, projector and language model learn captions
    ("a red circle") of every train-split image plus clean questions on the stage-1 images (never pool images).
    Returns ``(state_dict, info)``."""
    started = time.process_time()
    model = new_model(material, seed).to(device)
    labels = material.image_labels
    images = sorted(labels)
    rows = material.image_rows([os.path.join(material.train_folder, i) for i in images])
    shape_y = torch.tensor([SHAPES.index(labels[i]["shape"]) if "shape" in labels[i] else -100 for i in images])
    color_y = torch.tensor([COLORS.index(labels[i]["color"]) if "color" in labels[i] else -100 for i in images])
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(SHAPES) + len(COLORS)).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    schedule = linear_schedule(optimizer, vision_steps)
    generator = torch.Generator().manual_seed(seed)
    pixels = material.pixels
    for _ in range(vision_steps):
        b = torch.randint(0, len(images), (64,), generator=generator)
        feats = tower(pixel_values=pixels[rows[b]].to(device)).last_hidden_state[:, 1:].mean(dim=1)
        out = head(feats)
        loss = torch.nn.functional.cross_entropy(out[:, : len(SHAPES)], shape_y[b].to(device), ignore_index=-100) + \
            torch.nn.functional.cross_entropy(out[:, len(SHAPES):], color_y[b].to(device), ignore_index=-100)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    vision_loss = float(loss.detach()) if vision_steps else float("nan")
    for p in tower.parameters():
        p.requires_grad_(False)

    captions = [
        {"id": f"caption-{i}", "image": i, "conversations": [
            {"from": "human", "value": CAPTION_PROMPT},
            {"from": "gpt",
             "value": " ".join(x for x in ("a", labels[i].get("color"), labels[i].get("shape", "shape")) if x)},
        ]}
        for i in images
    ]
    stage1_set = set(split.stage1_images)
    questions = [r for r in material.train_records if r["image"] in stage1_set]
    rng = np.random.default_rng([seed, 3])
    keep = np.sort(rng.choice(len(questions), min(stage1_questions, len(questions)), replace=False))
    questions = [questions[i] for i in keep]
    data = tensorize(material, llava_dataset(material, captions + questions, material.train_folder))
    caption_loss = train_fixed_steps(model, data, material.pixels, steps=stage1_steps, batch_size=32, lr=lr, seed=seed,
                                     device=device)
    info = {"vision_loss": vision_loss, "stage1_loss": caption_loss, "captions": len(captions),
            "stage1_questions": len(questions), "cpu_s": time.process_time() - started}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, info


# -------------------------------------------------------------------------------------- evaluation helpers


def evaluate(model, material: Material, tests: dict[str, dict], metric, device) -> dict[str, float]:
    """Per-task accuracy: exact match of the answer-vocabulary prediction against the reference answer."""
    out = {}
    for task, data in tests.items():
        pred = predict_answers(model, data, material.pixels, material.answer_ids, device)
        predictions = [ALL_ANSWERS[i] for i in pred.tolist()]
        out[task] = float(metric.compute(predictions=predictions, references=data["answers"])["exact_match"])
    return out


def test_tensors(material: Material, split: SeedSplit, tasks) -> dict[str, dict]:
    tests = {}
    for task in tasks:
        records = split.test[task]
        data = tensorize(material, llava_dataset(material, records, material.test_folder))
        data["answers"] = [r["conversations"][1]["value"] for r in records]
        tests[task] = data
    return tests


def composition(records, kinds, selected: np.ndarray) -> dict:
    """What a subset holds: rows per question type, per answer and per hidden kind (counts)."""
    picked = np.flatnonzero(selected)
    return {
        "rows": int(len(picked)),
        "question_type": dict(Counter(question_type(records[i]["conversations"][0]["value"]) for i in picked)),
        "answer": dict(Counter(records[i]["conversations"][1]["value"] for i in picked)),
        "kind": dict(Counter(kinds[i] for i in picked)),
    }


# ------------------------------------------------------------------------------------------- selection rules


# Rule name base -> the select() method it runs.
BASE_METHODS = {"icons": "vote", "mean": "mean", "less": "task", "gain": "gain", "veto": "veto", "rank": "rank",
                "mix": "mix",                 "blend": "random", "random": "random", "full": None}


@dataclass(frozen=True)
class Rule:
    """A selection rule by name: ``<base>[-<task>][-sgd|-adam][-balanced|-zscore][-floor|-floor<percent>]``.

    Bases: ``icons`` (vote, the paper's generalist), ``mean`` (mean of task scores), ``less`` (one task's score;
    name the task: ``less-shape``), ``gain``/``veto``/``rank``/``mix`` (``select(method=...)`` with the method's own
    default ``task_floor``), ``blend`` (``select(method="random", task_floor=0.5)``: half per-task floors, half a seeded
    random sample), ``random``, ``full`` (the whole pool). Modifiers: ``sgd``/``adam`` choose the
    train-side feature (default ``adam``, the paper's); ``balanced`` / ``zscore`` choose
    :func:`icons_hf.compute_influence`'s ``specialist`` (default ``mean``, the paper's); ``floor`` reserves the
    whole subset as per-task floors (``select(task_floor=1.0)``), ``floor50`` half of it (``task_floor=0.5``);
    no floor is the paper's rule. So ``icons`` is the paper's rule and ``icons-sgd-balanced-floor`` the
    library's defaults.
    """

    name: str
    base: str
    task: str | None = None
    feature: str = "adam"
    specialist: str = "mean"
    floor: float | None = 0.0  # None: the select() method's own default task_floor

    @classmethod
    def parse(cls, name: str) -> Rule:
        parts = name.split("-")
        base, rest = parts[0], parts[1:]
        if base not in BASE_METHODS:
            raise ValueError(
                f"selection rule {name!r}: unknown base {base!r}; use icons, mean, less-<task>, gain, veto, rank, mix, "
                "blend, random or full."
            )
        task = None
        if base == "less":
            if not rest:
                raise ValueError(f"selection rule {name!r}: name the task, e.g. less-shape.")
            task, rest = rest[0], rest[1:]
        kw = {}
        for token in rest:
            if token in ("sgd", "adam"):
                kw["feature"] = token
            elif token in ("balanced", "zscore"):
                kw["specialist"] = token
            elif token == "floor":
                kw["floor"] = 1.0
            elif token.startswith("floor") and token[5:].isdigit() and 0 < int(token[5:]) <= 100:
                kw["floor"] = int(token[5:]) / 100
            else:
                raise ValueError(
                    f"selection rule {name!r}: unknown modifier {token!r} (use sgd, adam, balanced, zscore, floor, "
                    "floor<percent>)."
                )
        if base in ("random", "full") and kw:
            raise ValueError(f"selection rule {name!r}: {base} takes no modifiers.")
        if base in ("gain", "veto", "rank", "mix"):
            kw.setdefault("floor", None)
        elif base == "blend":
            kw.setdefault("floor", 0.5)
        return cls(name=name, base=base, task=task, **kw)

    @property
    def scored(self) -> bool:
        return self.base not in ("random", "full")


def select_rows(rule: Rule, scores: dict, n_rows: int, fraction: float, *, seed: int,
                threshold_percentile: float = 80.0) -> np.ndarray:
    """Boolean mask of the rows ``rule`` keeps at ``fraction`` of the pool."""
    from icons_hf import select

    if rule.base == "full":
        return np.ones(n_rows, dtype=bool)
    table = scores[("sgd", "balanced")] if rule.base == "random" else scores[(rule.feature, rule.specialist)]
    method = BASE_METHODS[rule.base]
    out = select(table, fraction=fraction, threshold_percentile=threshold_percentile, method=method, task=rule.task,
                 seed=seed, task_floor=rule.floor)
    cols = column_arrays(out, ["index", "selected"])
    mask = np.zeros(n_rows, dtype=bool)
    mask[cols["index"][cols["selected"].astype(bool)]] = True
    return mask


# ------------------------------------------------------------------------------------ warmup and features


class Scores:
    """Per-task score tables of a pool, computed on first use from the gradient stores the warmup wrote:
    ``scores[(feature, specialist)]`` with feature ``adam``/``sgd`` and specialist ``mean`` (the paper's),
    ``balanced`` (per-validation-example quota) or ``zscore``."""

    def __init__(self, folder: str):
        self.folder = folder
        self._tables: dict = {}

    def __getitem__(self, key):
        from icons_hf import compute_influence, load_run

        if key not in self._tables:
            feature, specialist = key
            train, tasks = load_run(os.path.join(self.folder, f"features-{feature}"))
            self._tables[key] = compute_influence(train, tasks, specialist=specialist)
        return self._tables[key]


def warmup_features(material: Material, model, pool_ds, validation: dict, *, out_dir: str, seed: int, args,
                    device) -> dict:
    """Warm up LoRA on a random share of the pool with ``transformers.Trainer``; at each checkpoint
    ``IconsCallback`` writes Adam (LESS) and SGD train features (``<out_dir>/features-<kind>``), and the Adam
    features are split into momentum and gradient terms on a sample of rows. Returns the diagnostics."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from icons_hf import IconsCallback
    from icons_hf.data import IconsCollator
    from icons_hf.distributed import barrier
    from icons_hf.variants import adam_feature_diagnostics, pairwise_cosine

    rng = np.random.default_rng([seed, 4])
    n = len(pool_ds)
    warm_rows = np.sort(rng.choice(n, max(1, int(round(args.warmup_fraction * n))), replace=False))
    warm_ds = pool_ds.select(warm_rows)
    diag_ds = pool_ds.select(np.sort(rng.choice(n, min(args.diagnostic_rows, n), replace=False)))
    pad = material.tokenizer.pad_token_id
    callbacks = {
        kind: IconsCallback(pool_ds, validation, os.path.join(out_dir, f"features-{kind}"), train_feature=kind,
                            dim=args.dim, seed=seed, batch_size=32, pad_token_id=pad)
        for kind in ("adam", "sgd")
    }
    diagnostics: list[dict] = []

    class MomentumShare(TrainerCallback):
        def on_save(self, targs, state, control, model=None, optimizer=None, **kwargs):
            # A folder every process sees: under a multi-process launch the rows are split between processes.
            work = os.path.join(out_dir, f"adam-terms-{state.global_step}")
            entry = adam_feature_diagnostics(model, diag_ds, optimizer, batch_size=32, pad_token_id=pad, work_dir=work)
            diagnostics.append({"step": state.global_step, **entry})
            barrier()
            if state.is_world_process_zero:
                shutil.rmtree(work, ignore_errors=True)

    steps_per_epoch = math.ceil(len(warm_ds) / args.warmup_batch_size)
    total = steps_per_epoch * args.warmup_epochs
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, "warmup"),
        per_device_train_batch_size=args.warmup_batch_size,
        num_train_epochs=args.warmup_epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, total // 10),
        save_strategy="steps",
        save_steps=max(1, total // args.checkpoints),
        save_only_model=True,
        logging_steps=max(1, total // 4),
        report_to="none",
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        seed=seed,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=warm_ds, data_collator=IconsCollator(pad),
                      callbacks=[callbacks["adam"], callbacks["sgd"], MomentumShare()])
    trainer.train()
    return {
        "warmup_rows": int(len(warm_ds)),
        "warmup_steps": int(trainer.state.global_step),
        "checkpoints": [c["checkpoint"] for c in callbacks["adam"].checkpoints],
        "adam_terms": diagnostics,
        "pairwise_cosine_projected": {
            kind: [pairwise_cosine(p, rows=256, seed=seed) for p in cb.stores()[0]] for kind, cb in callbacks.items()
        },
    }


# ------------------------------------------------------------------------------------------------- jobs


def run_key(rule: str, fraction: float) -> str:
    return f"{rule}@{fraction:g}"


def seed_dir(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, f"seed{seed}")


def pool_dir(output_dir: str, seed: int, pool: str) -> str:
    return os.path.join(output_dir, f"seed{seed}", f"pool{pool}")


def _write_json(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


class Worker(JobCache):
    """Per-process state for running jobs: the material and caches of splits, base models, pools and test sets."""

    def __init__(self, args, device: torch.device, rank: int = 0):
        super().__init__()
        self.args = args
        self.device = device
        self.rank = rank
        self._material: Material | None = None
        self._metric = None

    @property
    def material(self) -> Material:
        if self._material is None:
            self._material = Material()
            cache = os.path.join(self.args.output_dir, "material", "pixels")
            self._material.load_pixels(cache)
        return self._material

    @property
    def metric(self):
        if self._metric is None:
            from icons_hf.metrics import load_metric

            self._metric = load_metric("exact_match")
        return self._metric

    def split(self, seed: int) -> SeedSplit:
        a = self.args
        return self.cached(("split", seed), lambda: seed_split(
            self.material, seed, stage1_images=a.stage1_images, validation_per_task=a.validation_per_task,
            test_per_task=a.test_per_task))

    def tests(self, seed: int) -> dict:
        tasks = ("shape", "color", "yesno")
        return self.cached(("tests", seed), lambda: test_tensors(self.material, self.split(seed), tasks))

    def stage1_state(self, seed: int) -> dict:
        from safetensors.torch import load_file

        path = os.path.join(seed_dir(self.args.output_dir, seed), "stage1.safetensors")
        return self.cached(("stage1", seed), lambda: load_file(path))

    def pool(self, seed: int, name: str):
        def build():
            path = os.path.join(pool_dir(self.args.output_dir, seed, name), "pool.json")
            saved = _read_json(path)
            records, kinds = saved["records"], saved["kinds"]
            dataset = llava_dataset(self.material, records, self.material.train_folder)
            return records, kinds, dataset, tensorize(self.material, dataset)

        return self.cached(("pool", seed, name), build)

    # -- the three kinds of job ---------------------------------------------------------------------------

    def run(self, job: dict) -> dict:
        kind = job["kind"]
        started, cpu = time.perf_counter(), time.process_time()
        if kind == "stage1":
            out = self.stage1(job["seed"])
        elif kind == "prep":
            out = self.prep(job["seed"], job["pool"], job["runs"])
        elif kind == "train":
            out = self.train(job["seed"], job["pool"], job["rule"], job["fraction"])
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        out = dict(out)
        out["job_wall_s"] = time.perf_counter() - started
        out["job_cpu_s"] = time.process_time() - cpu
        out.setdefault("cached", False)
        return out

    def stage1(self, seed: int) -> dict:
        from safetensors.torch import save_file

        folder = seed_dir(self.args.output_dir, seed)
        done = os.path.join(folder, "stage1.json")
        if os.path.isfile(done):
            return {**_read_json(done), "cached": True}
        os.makedirs(folder, exist_ok=True)
        a = self.args
        state, info = stage_one(self.material, self.split(seed), seed=seed, vision_steps=a.vision_steps,
                                stage1_steps=a.stage1_steps, stage1_questions=a.stage1_questions, lr=a.learning_rate,
                                device=self.device)
        model = new_model(self.material, seed)
        model.load_state_dict(state)
        info["accuracy"] = evaluate(model.to(self.device), self.material, self.tests(seed), self.metric, self.device)
        save_file(state, os.path.join(folder, "stage1.safetensors"))
        _write_json(done, info)
        return info

    def prep(self, seed: int, name: str, runs: list) -> dict:
        from icons_hf.distributed import barrier

        folder = pool_dir(self.args.output_dir, seed, name)
        done = os.path.join(folder, "selections.json")
        selections = _read_json(done) if os.path.isfile(done) else {}
        missing = [(r, f) for r, f in runs if run_key(r, f) not in selections]
        if not missing:
            return {"cached": True}
        a, material = self.args, self.material
        diag_path = os.path.join(folder, "diagnostics.json")
        if not os.path.isfile(diag_path):
            spec = POOLS[name]
            split = self.split(seed)
            os.makedirs(folder, exist_ok=True)
            records, kinds = build_pool(material, split, spec, size=a.pool_size, seed=seed,
                                        image_dir=os.path.abspath(os.path.join(folder, "unreadable")))
            if self.rank == 0:
                _write_json(os.path.join(folder, "pool.json"), {"records": records, "kinds": kinds})
            barrier()
            _, _, pool_ds, _ = self.pool(seed, name)
            validation = {t: llava_dataset(material, split.validation[t], material.test_folder) for t in spec.tasks}
            model = stage_two_model(material, self.stage1_state(seed), seed, a.lora_r, self.device)
            started = time.process_time()
            diagnostics = warmup_features(material, model, pool_ds, validation, out_dir=folder, seed=seed, args=a,
                                          device=self.device)
            diagnostics["cpu_s"] = time.process_time() - started
            if self.rank == 0:
                _write_json(diag_path, diagnostics)
            barrier()
        records, kinds, _, _ = self.pool(seed, name)
        scores = Scores(folder)
        for rule_name, fraction in missing:
            mask = select_rows(Rule.parse(rule_name), scores, len(records), fraction, seed=seed,
                               threshold_percentile=a.threshold_percentile)
            selections[run_key(rule_name, fraction)] = {
                "rule": rule_name, "fraction": fraction, "rows": np.flatnonzero(mask).tolist(),
                "composition": composition(records, kinds, mask),
            }
        if self.rank == 0:
            _write_json(done, selections)
        barrier()
        return {"cached": False, "new_selections": len(missing)}

    def train(self, seed: int, name: str, rule: str, fraction: float) -> dict:
        folder = os.path.join(pool_dir(self.args.output_dir, seed, name), "runs")
        done = os.path.join(folder, f"{run_key(rule, fraction)}.json")
        if os.path.isfile(done):
            return {**_read_json(done), "cached": True}
        os.makedirs(folder, exist_ok=True)
        a = self.args
        selections = _read_json(os.path.join(pool_dir(a.output_dir, seed, name), "selections.json"))
        selection = selections[run_key(rule, fraction)]
        _, _, _, data = self.pool(seed, name)
        rows = torch.tensor(selection["rows"], dtype=torch.long)
        subset = {k: v[rows] for k, v in data.items()}
        model = stage_two_model(self.material, self.stage1_state(seed), seed, a.lora_r, self.device)
        started = time.process_time()
        loss = train_fixed_steps(model, subset, self.material.pixels, steps=a.train_steps, batch_size=a.batch_size,
                                 lr=a.learning_rate, seed=seed, device=self.device)
        train_cpu = time.process_time() - started
        accuracy = evaluate(model, self.material, self.tests(seed), self.metric, self.device)
        out = {"seed": seed, "pool": name, "rule": rule, "fraction": fraction, "rows": len(rows),
               "accuracy": accuracy, "last_loss": loss, "train_cpu_s": train_cpu}
        _write_json(done, out)
        return out


_WORKER: Worker | None = None


def init_worker(args_dict: dict, threads: int) -> None:
    """Process-pool initializer: one Worker per process, on the CPU, with ``threads`` torch threads."""
    global _WORKER
    from types import SimpleNamespace

    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _WORKER = Worker(SimpleNamespace(**args_dict), torch.device("cpu"))


def run_in_worker(job: dict) -> dict:
    if _WORKER is None:
        raise RuntimeError("run_in_worker called in a process that init_worker did not set up.")
    return _WORKER.run(job)
