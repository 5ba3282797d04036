"""FeatureSettings.parameters: which parameters give the gradient features. 'trainable' (default) takes every
trainable linear layer, so a trainable projector beside the LoRA adapters counts; 'lora' (the paper preset, as the
released ICONS code) takes the LoRA parameters only. The choice is in the store, and stores of both are never
mixed."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from icons_hf import compute_gradients, compute_influence, load_gradients
from icons_hf.gradients.loss import per_row_loss
from icons_hf.settings import FeatureSettings
from icons_hf.store import read_store_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITY = dict(projection="identity", dtype="float32", batch_size=3, show_progress=False)


def _model_with_trainable_projector(tiny_lora_llama):
    """LoRA on q/v plus a trainable non-LoRA linear layer (as LLaVA's LoRA recipe trains its projector)."""
    model = tiny_lora_llama(seed=0)
    projector = model.base_model.model.model.layers[0].mlp.down_proj
    assert not any("lora_" in n for n, _ in projector.named_parameters())
    projector.weight.requires_grad_(True)
    return model, projector


def _features(model, rows, path, **kwargs):
    store = compute_gradients(model, Dataset.from_list(rows), output_dir=path, **IDENTITY, **kwargs)
    return store, np.asarray(load_gradients(store).with_format("numpy")[:]["features"], dtype=np.float64)


def _lora_autograd(model, rows):
    """Batch-size-1 autograd of each row's loss (mean over its supervised tokens) on the LoRA parameters only."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    model.eval()
    out = []
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        grads = torch.autograd.grad(per_row_loss(logits, labels)[0], [p for _, p in params])
        out.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(out)


def test_lora_features_leave_the_projector_out_and_equal_autograd_on_lora_parameters(tmp_path, tiny_lora_llama,
                                                                                     token_rows):
    model, projector = _model_with_trainable_projector(tiny_lora_llama)
    rows = token_rows(5, seed=3)
    all_store, all_feats = _features(model, rows, tmp_path / "trainable")
    lora_store, lora_feats = _features(model, rows, tmp_path / "lora", parameters="lora")
    all_names = list(read_store_metadata(all_store)["config"]["parameters"])
    lora_names = list(read_store_metadata(lora_store)["config"]["parameters"])
    assert any("down_proj" in n for n in all_names) and not any("down_proj" in n for n in lora_names)
    assert set(lora_names) < set(all_names) and all("lora_" in n for n in lora_names)
    assert all_feats.shape[1] == lora_feats.shape[1] + projector.weight.numel()
    want = _lora_autograd(model, rows)
    for got, ref in zip(lora_feats, want, strict=True):
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)
    # Identity features are the flat gradients in parameter order: the default's are the LoRA coordinates plus
    # the projector's, which are not zero, so the two choices give different features.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_lora = np.concatenate([np.full(p.numel(), "lora_" in n) for n, p in trainable])
    np.testing.assert_allclose(all_feats[:, is_lora], lora_feats, rtol=1e-6, atol=1e-9)
    assert np.linalg.norm(all_feats[:, ~is_lora], axis=1).min() > 0
    def cosines(x):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        return unit @ unit.T

    assert np.abs(cosines(all_feats) - cosines(lora_feats)).max() > 1e-3  # influence between rows changes


def test_the_choice_is_in_the_store_and_stores_of_both_are_not_mixed(tmp_path, tiny_lora_llama, token_rows):
    model, _ = _model_with_trainable_projector(tiny_lora_llama)
    rows = token_rows(4, seed=4)
    kwargs = dict(projection="countsketch", dim=16, show_progress=False)
    train = compute_gradients(model, Dataset.from_list(rows), output_dir=tmp_path / "train", parameters="lora",
                              **kwargs)
    val = compute_gradients(model, Dataset.from_list(rows[:2]), output_dir=tmp_path / "val", **kwargs)
    meta = read_store_metadata(train)
    assert meta["settings"]["parameters"] == "lora" and meta["config"]["gradient_parameters"] == "lora"
    assert "gradient_parameters" not in read_store_metadata(val)["config"]  # the default keeps the old layout
    with pytest.raises(ValueError, match="parameters"):
        compute_influence(train, {"t": val})
    with pytest.raises(ValueError, match=r"already holds a gradient store written with other settings"):
        compute_gradients(model, Dataset.from_list(rows), output_dir=tmp_path / "train", **kwargs)


def test_lora_only_on_a_model_without_lora_is_refused(tmp_path, token_rows):
    from icons_hf.testing import tiny_llama

    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="parameters='lora' but the model has no trainable LoRA parameter"):
        compute_gradients(model, Dataset.from_list(token_rows(2)), output_dir=tmp_path / "s", parameters="lora",
                          dim=8, show_progress=False)


def test_the_paper_preset_takes_lora_parameters_only():
    assert FeatureSettings.from_preset("paper").parameters == "lora"
    assert FeatureSettings().parameters == "trainable"
    with pytest.raises(ValueError, match="parameters='all' is not supported"):
        FeatureSettings(parameters="all")
