"""The per-example gradient engine against independent references.

Reference: for each row alone, ``model(**inputs, labels=labels).loss.backward()`` (the model's own loss, batch of
one) and the trainable parameters' ``.grad`` concatenated in ``named_parameters`` order; the engine's
``projection="identity"`` feature must equal it. Every model is tiny, built from a config in code, and runs on CPU.
"""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn

from icons_hf import compute_gradients, load_gradients
from icons_hf.gradients import AdamState, LinearCapture, Projector
from icons_hf.gradients.batching import plan_batches
from icons_hf.gradients.loss import per_row_loss, supervised_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCAB = 64
IMAGE = 60  # image token id of the VLMs (Qwen2-VL: 58/59 open/close the image)
TEXT_TOKENS = (1, 56)

# --------------------------------------------------------------------------------------------- model families


def _lora(model, target, seed, **kwargs):
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


def _text_config(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **extra)


def build_causal(kind, seed=0, **lora_kwargs):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_text_config()))
    target = lora_kwargs.pop("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    return _lora(model, target, seed, **lora_kwargs)


def build_llava(seed=0):
    from icons_hf.testing import build_tiny_llava

    model = build_tiny_llava(VOCAB, IMAGE, 0, seed=seed)
    return _lora(model, r".*language_model.*\.(q_proj|v_proj)", seed, modules_to_save=["multi_modal_projector"])


def build_qwen2_vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=1, in_channels=3),
        text_config=_text_config(rope_parameters=rope, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE, video_token_id=61, vision_start_token_id=58, vision_end_token_id=59,
    )
    return _lora(Qwen2VLForConditionalGeneration(config), r".*language_model.*\.(q_proj|v_proj|o_proj)", seed)


def build_idefics3(seed=0, smolvlm=False):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    config_cls, model_cls = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smolvlm else (
        Idefics3Config, Idefics3ForConditionalGeneration)
    torch.manual_seed(seed)
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **_text_config()), scale_factor=2, image_token_id=IMAGE,
    )
    return _lora(model_cls(config), r".*text_model.*\.(q_proj|v_proj)", seed)


# ----------------------------------------------------------------------------------------------------- rows


def _text(rng, lo=4, hi=14):
    return rng.integers(*TEXT_TOKENS, int(rng.integers(lo, hi))).tolist()


def _row(prefix, rng, **extra):
    """``prefix`` (unsupervised) then a prompt and an answer; only the answer is supervised."""
    prompt, answer = _text(rng, 2, 6), _text(rng, 2, 9)
    ids = [1, *prefix, *prompt, *answer]
    return {"input_ids": ids, "labels": [-100] * (len(ids) - len(answer)) + answer, **extra}


def text_rows(n, seed):
    rng = np.random.default_rng(seed)
    return [_row([], rng) for _ in range(n)]


def llava_rows(n, seed):
    rng = np.random.default_rng(seed)
    return [_row([IMAGE] * 16, rng, pixel_values=rng.standard_normal((3, 32, 32)).astype(np.float32))
            for _ in range(n)]


def qwen2_vl_rows(n, seed):
    """Images of two sizes (4x4 or 2x4 patches of 2x2 pixels, merged 2x2 into 4 or 2 tokens)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = (4, 4) if i % 2 == 0 else (2, 4)
        row = _row([58, *[IMAGE] * (h * w // 4), 59], rng,
                   pixel_values=rng.standard_normal((h * w, 12)).astype(np.float32), image_grid_thw=[[1, h, w]])
        row["mm_token_type_ids"] = [int(t == IMAGE) for t in row["input_ids"]]
        rows.append(row)
    return rows


def idefics3_rows(n, seed):
    """One or two 16x16 images per row (4 tokens each): rows with one image are zero-padded in a batch."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        images = 1 + i % 2
        rows.append(_row([IMAGE] * (4 * images), rng,
                         pixel_values=rng.standard_normal((images, 3, 16, 16)).astype(np.float32)))
    return rows


def single_inputs(row):
    """One row as the model takes it, built by hand (independent of the engine's collation)."""
    out = {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]]),
           "attention_mask": torch.ones(1, len(row["input_ids"]), dtype=torch.long)}
    if "image_grid_thw" in row:  # packed: no batch axis
        out["pixel_values"] = torch.tensor(row["pixel_values"])
        out["image_grid_thw"] = torch.tensor(row["image_grid_thw"])
        out["mm_token_type_ids"] = torch.tensor([row["mm_token_type_ids"]])
    elif "pixel_values" in row:
        out["pixel_values"] = torch.tensor(row["pixel_values"])[None]
    return out


FAMILIES = {
    "llama": (lambda seed=0: build_causal("llama", seed), text_rows),
    "qwen2": (lambda seed=0: build_causal("qwen2", seed), text_rows),
    "mistral": (lambda seed=0: build_causal("mistral", seed), text_rows),
    "llava": (build_llava, llava_rows),
    "qwen2_vl": (build_qwen2_vl, qwen2_vl_rows),
    "idefics3": (build_idefics3, idefics3_rows),
    "smolvlm": (lambda seed=0: build_idefics3(seed, smolvlm=True), idefics3_rows),
}

# ------------------------------------------------------------------------------------------------- helpers


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reference_gradients(model, rows):
    """Batch-size-1 autograd: one flat float64 gradient per row (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for row in rows:
        model.zero_grad(set_to_none=True)
        model(**single_inputs(row)).loss.backward()
        out.append(torch.cat([p.grad.reshape(-1) for _, p in trainable(model)]).double().numpy())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return np.stack(out)


def features(model, rows, tmp_path, name="store", **kwargs):
    kwargs = {"projection": "identity", "dtype": "float32", "batch_size": 3, "show_progress": False, **kwargs}
    path = compute_gradients(model, Dataset.from_list(rows), output_dir=tmp_path / name, **kwargs)
    table = load_gradients(path).with_format("numpy")[:]
    assert table["index"].tolist() == list(range(len(rows)))
    return np.asarray(table["features"], dtype=np.float64)


def assert_rows_close(got, want, rtol=1e-5):
    assert got.shape == want.shape
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err <= rtol, f"row {i}: relative error {err:.2e} > {rtol:.0e}"


def random_adam_state(model, seed, betas=(0.8, 0.99), eps=1e-7, step=7):
    gen = torch.Generator().manual_seed(seed)
    moments = {
        n: {"exp_avg": torch.randn(p.shape, generator=gen) * 1e-2,
            "exp_avg_sq": torch.rand(p.shape, generator=gen) * 1e-4, "step": torch.tensor(float(step))}
        for n, p in trainable(model)
    }
    return AdamState(moments, betas=betas, eps=eps)


def flat_moments(state, model):
    m = np.concatenate([state.moments[n]["exp_avg"].double().reshape(-1).numpy() for n, _ in trainable(model)])
    v = np.concatenate([state.moments[n]["exp_avg_sq"].double().reshape(-1).numpy() for n, _ in trainable(model)])
    return m, v


def adam_formula(g, m, v, betas, eps, step, variant):
    """The two Adam maps written out (see icons_hf.features), on float64 gradients."""
    b1, b2 = betas
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g**2
    if variant == "less":
        return m1 / np.sqrt(v1 + eps)
    t = step + 1
    return (m1 / (1 - b1**t)) / (np.sqrt(v1 / (1 - b2**t)) + eps)


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_features_equal_batch_size_one_autograd(family, tmp_path):
    build, make_rows = FAMILIES[family]
    model = build()
    rows = make_rows(5, seed=11)
    want = reference_gradients(model, rows)
    # The reference is informative: every row has a gradient, and no two rows share one (so a feature of the wrong
    # row, or of a neighbour in its batch, would be caught below).
    norms = np.linalg.norm(want, axis=1)
    assert (norms > 0).all()
    gaps = np.linalg.norm(want[:, None, :] - want[None, :, :], axis=2) / norms[:, None]
    assert gaps[~np.eye(len(want), dtype=bool)].min() > 1e-3
    got = features(model, rows, tmp_path)  # batches of 3: padding, uneven lengths, images of different sizes
    assert_rows_close(got, want)


@pytest.mark.parametrize("variant", ["less", "torch"])
def test_adam_features_match_hand_formula_and_leave_state_alone(variant, tmp_path):
    model = build_causal("qwen2", seed=2, bias="lora_only")  # trainable biases too
    rows = text_rows(6, seed=3)
    state = random_adam_state(model, seed=4)
    before = {n: {k: v.clone() for k, v in s.items()} for n, s in state.moments.items()}
    got = features(model, rows, tmp_path, feature="adam", optimizer_state=state, adam_variant=variant)
    m, v = flat_moments(state, model)
    want = adam_formula(reference_gradients(model, rows), m, v, state.betas, state.eps, 7, variant)
    assert_rows_close(got, want)
    for name, moments in before.items():
        for key, value in moments.items():
            assert torch.equal(state.moments[name][key], value), (name, key)


def test_adam_features_from_a_live_adamw_after_a_real_step(tmp_path):
    """The ``torch`` variant is the update AdamW would apply next: checked by stepping a copy of the optimizer with
    the row's gradient (lr=1, no decay); the live optimizer's state is bit-identical afterwards."""
    model = build_causal("llama", seed=5)
    rows = text_rows(5, seed=6)
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    model.train()
    for row in text_rows(2, seed=7):
        model(**single_inputs(row)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    snapshot = copy.deepcopy(optimizer.state_dict())
    grads = reference_gradients(model, rows)
    got = {v: features(model, rows, tmp_path, name=v, feature="adam", optimizer_state=optimizer, adam_variant=v)
           for v in ("less", "torch")}

    after = optimizer.state_dict()
    for pid, st in snapshot["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value), (pid, key)
    assert model.training and all(p.grad is None for p in params)

    want = []
    for g in grads:
        clone = copy.deepcopy(model)
        clone_params = [p for _, p in trainable(clone)]
        stepper = torch.optim.AdamW(clone_params, lr=1.0, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
        stepper.load_state_dict(copy.deepcopy(snapshot))
        for group in stepper.param_groups:
            group.update(lr=1.0, weight_decay=0.0)
        start = torch.cat([p.detach().reshape(-1) for p in clone_params]).double()
        offset = 0
        for p in clone_params:
            p.grad = torch.from_numpy(g[offset: offset + p.numel()]).float().reshape(p.shape)
            offset += p.numel()
        stepper.step()
        want.append((start - torch.cat([p.detach().reshape(-1) for p in clone_params]).double()).numpy())
    assert_rows_close(got["torch"], np.stack(want), rtol=1e-4)

    state = AdamState.from_optimizer(optimizer, model)
    m, v = flat_moments(state, model)
    assert_rows_close(got["less"], adam_formula(grads, m, v, (0.9, 0.95), 1e-6, 2, "less"))


def test_trainer_optimizer_pt_maps_to_the_live_optimizer_state(tmp_path):
    """optimizer.pt of a real Trainer checkpoint, read by parameter name, equals the live optimizer's state at that
    step; the weight-decay group (LoRA weights) and the no-decay group (biases) are both exercised."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from icons_hf.data import IconsCollator

    model = build_causal("qwen2", seed=8, bias="lora_only")
    live = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            live["state"] = AdamState.from_optimizer(optimizer, model)
            live["copy"] = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                            for n, s in live["state"].moments.items()}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, save_steps=3,
                             learning_rate=1e-2, adam_beta2=0.99, adam_epsilon=1e-7, weight_decay=0.1, report_to="none",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(text_rows(12, seed=9)),
            data_collator=IconsCollator(0), callbacks=[Snapshot()]).train()
    read = AdamState.from_checkpoint(tmp_path / "run" / "checkpoint-3", model)
    names = [n for n, _ in trainable(model)]
    assert set(read.moments) == set(live["copy"]) == set(names)
    assert any(n.endswith("bias") for n in names) and any("lora_A" in n for n in names)
    for name in names:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(read.moments[name][key], live["copy"][name][key]), (name, key)
        assert read.moments[name]["step"] == live["copy"][name]["step"] == 3
    assert read.betas == (0.9, 0.99) and read.eps == pytest.approx(1e-7)


# ------------------------------------------------------------------------------------------- batching, determinism


@pytest.mark.parametrize("projection", ["countsketch", "rademacher"])
def test_projected_feature_does_not_depend_on_neighbours_or_batch_size(projection, tmp_path):
    model = build_causal("llama", seed=12)
    target = text_rows(1, seed=13)[0]
    others = text_rows(12, seed=14)
    kwargs = dict(projection=projection, dim=96, seed=3)
    alone = features(model, [target], tmp_path, name="alone", batch_size=1, **kwargs)[0]
    in_eight = features(model, [*others[:4], target, *others[4:7]], tmp_path, name="eight", batch_size=8, **kwargs)[4]
    other_batch = features(model, [*others[7:], target], tmp_path, name="three", batch_size=3, **kwargs)[5]
    for got in (in_eight, other_batch):
        assert_rows_close(got[None], alone[None])
    assert np.linalg.norm(alone) > 0


def test_token_budget_changes_batches_not_features(tmp_path):
    from icons_hf.testing import record_forward_calls

    model = build_causal("mistral", seed=15)
    rows = text_rows(9, seed=16)
    with record_forward_calls(model) as plain_calls:
        plain = features(model, rows, tmp_path, name="plain", batch_size=4)
    with record_forward_calls(model) as budget_calls:
        budget = features(model, rows, tmp_path, name="budget", batch_size=4, max_tokens_per_batch=30)
    assert_rows_close(budget, plain)
    plain_shapes = [c["input_shape"] for c in plain_calls]
    budget_shapes = [c["input_shape"] for c in budget_calls]
    # The budget did change the batches: more of them, each within 30 padded tokens unless it holds one row.
    assert sum(n for n, _ in plain_shapes) == sum(n for n, _ in budget_shapes) == len(rows)
    assert max(n * width for n, width in plain_shapes) > 30
    assert len(budget_shapes) > len(plain_shapes)
    assert all(n == 1 or n * width <= 30 for n, width in budget_shapes)


def test_plan_batches_respects_rows_and_token_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 200)
    rows = np.arange(1000, 1200)
    batches = plan_batches(rows, lengths, batch_size=8, max_tokens=100)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == rows.tolist()
    size = dict(zip(rows.tolist(), lengths.tolist(), strict=True))
    seq = [size[r] for r in flat.tolist()]
    assert seq == sorted(seq, reverse=True)
    for batch in batches:
        widths = [size[r] for r in batch.tolist()]
        assert len(batch) <= 8
        assert len(batch) == 1 or len(batch) * max(widths) <= 100
    assert [len(b) for b in plan_batches(rows[:20], lengths[:20], 8)] == [8, 8, 4]


def test_loss_on_selected_positions_equals_full_logits():
    model = build_causal("llama", seed=17).eval()
    rows = text_rows(4, seed=18)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        selected, counts = supervised_losses(model, batch, labels, True)
        full, full_counts = per_row_loss(model(**batch).logits, labels)
    torch.testing.assert_close(selected, full, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == full_counts.tolist()


def test_lora_on_the_head_falls_back_to_full_logits(tmp_path):
    from icons_hf.testing import record_forward_calls

    rows = text_rows(4, seed=20)
    # Without LoRA on the head, extraction asks for the supervised positions' logits only (logits_to_keep)...
    body_only = build_causal("llama", seed=19, target_modules=["q_proj"])
    with record_forward_calls(body_only) as calls:
        features(body_only, rows, tmp_path, name="body")
    assert calls and all("logits_to_keep" in c["kwargs"] for c in calls)
    # ...with LoRA on the head it takes the full-logits path, and the features are still exact.
    model = build_causal("llama", seed=19, target_modules=["q_proj", "lm_head"])
    with record_forward_calls(model) as calls:
        got = features(model, rows, tmp_path, name="head")
    assert calls and not any("logits_to_keep" in c["kwargs"] for c in calls)
    assert_rows_close(got, reference_gradients(model, rows))


# ------------------------------------------------------------------- checkpointing, dtypes, dropout, modes


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_stays_on_and_gives_the_same_features(reentrant, tmp_path):
    rows = text_rows(4, seed=21)
    reference = features(build_causal("llama", seed=22), rows, tmp_path, name="plain", batch_size=4)
    model = build_causal("llama", seed=22)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    layer = model.get_base_model().model.layers[0]
    func = layer._gradient_checkpointing_func
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    got = features(model, rows, tmp_path, name="ckpt", batch_size=4)
    assert_rows_close(got, reference)
    assert len(calls) == 2  # one batch: the forward pass and its recomputation in the backward pass
    assert model.training and layer.training and layer._gradient_checkpointing_func is func


def test_reentrant_checkpoint_outside_transformers_is_a_clear_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)

    block = Block()
    capture = LinearCapture(block)
    x = torch.randn(2, 3, 4, requires_grad=True)
    with capture:
        loss = block(x).sum()
        with pytest.raises(RuntimeError, match="use_reentrant"):
            capture.backward(loss, 2, lambda name, grads: None)


def test_bf16_model_features_follow_the_float32_model(tmp_path):
    model = build_causal("llama", seed=23)
    rows = text_rows(5, seed=24)
    want = features(model, rows, tmp_path, name="fp32")
    got = features(copy.deepcopy(model).to(torch.bfloat16), rows, tmp_path, name="bf16")
    for a, b in zip(got, want, strict=True):
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.995 and np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1


def test_lora_dropout_is_off_during_extraction(tmp_path):
    rows = text_rows(5, seed=25)
    plain = build_causal("llama", seed=26)
    dropped = build_causal("llama", seed=26, lora_dropout=0.5)
    for (n, a), (_, b) in zip(plain.named_parameters(), dropped.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    dropped.train()
    got = features(dropped, rows, tmp_path, name="dropout")
    assert dropped.training
    assert_rows_close(got, features(plain, rows, tmp_path, name="plain"), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ projections


def test_countsketch_cosines_track_exact_cosines():
    """Countsketch keeps inner products in expectation with variance <= 2|a|^2|b|^2/dim, so at dim 2048 cosine errors
    have a standard deviation of at most ~0.03. Vectors: a shared direction plus noise, in four parameters of
    different scales (as layers differ), giving cosines across [0, 0.9]."""
    rng = np.random.default_rng(0)
    shapes = {"a": 6000, "b": 9000, "c": 3000, "d": 12000}
    scales = {"a": 1.0, "b": 0.2, "c": 3.0, "d": 0.5}
    n, dim = 24, 2048
    shared = {k: rng.standard_normal(s) for k, s in shapes.items()}
    weights = np.linspace(0.0, 3.0, n)
    parts = {k: scales[k] * (weights[:, None] * shared[k] + rng.standard_normal((n, s))) for k, s in shapes.items()}
    exact = np.concatenate([parts[k] for k in shapes], axis=1)
    projector = Projector("countsketch", dim, seed=1, shapes=shapes)
    out = projector.new_output(n)
    for k in shapes:
        projector.accumulate(out, k, torch.from_numpy(parts[k]).float())
    sketch = out.double().numpy()

    def cosines(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (x @ x.T)[np.triu_indices(n, 1)]

    want, got = cosines(exact), cosines(sketch)
    assert want.min() < 0.1 and want.max() > 0.8
    err = np.abs(got - want)
    assert err.mean() < 0.03 and err.max() < 0.15
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(got), ranks(want))[0, 1] > 0.95


def test_projections_are_fixed_by_seed_name_and_dim():
    shapes = {"layer.weight": 500, "layer.bias": 20}
    grads = torch.randn(3, 500)
    for kind in ("countsketch", "rademacher"):
        results = []
        for seed in (0, 0, 1):
            projector = Projector(kind, 64, seed=seed, shapes=shapes)
            out = projector.new_output(3)
            projector.accumulate(out, "layer.weight", grads)
            results.append(out)
        assert torch.equal(results[0], results[1]) and not torch.allclose(results[0], results[2])
