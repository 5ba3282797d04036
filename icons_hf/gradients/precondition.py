"""What turns a per-example gradient into a feature: the checkpoint's optimizer state (:class:`AdamState`), its
learning rate, and :class:`Preconditioner`, which runs the registered feature type (formulas in
:mod:`icons_hf.features`).

The optimizer state is read, never written: every example sees the same state, and the optimizer is unchanged
afterwards.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import torch

from ..distributed import is_main_process
from ..features import FEATURE_TYPES
from ..settings import FeatureSettings, validate_choice

logger = logging.getLogger(__name__)


class AdamState:
    """Read-only Adam moments for the trainable parameters, keyed by parameter name."""

    def __init__(
        self, moments: Mapping[str, Mapping[str, torch.Tensor]], betas=(0.9, 0.999), eps=1e-8, source="mapping"
    ):
        self.moments = {name: dict(state) for name, state in moments.items()}
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.source = source
        for name, state in self.moments.items():
            missing = [key for key in ("exp_avg", "exp_avg_sq") if key not in state]
            if missing:
                raise ValueError(
                    f"optimizer state of parameter {name!r} lacks {', '.join(missing)}; an Adam feature needs the "
                    "first and second moments of an Adam/AdamW optimizer."
                )

    def check_covers(self, shapes: Mapping[str, torch.Size]) -> None:
        missing = [name for name in shapes if name not in self.moments]
        if missing:
            raise ValueError(
                f"the optimizer state ({self.source}) has no moments for {len(missing)} trainable parameter(s), "
                f"e.g. {missing[0]!r}. Was it saved by the same model/adapter after at least one optimizer step?"
            )
        for name, shape in shapes.items():
            got = tuple(self.moments[name]["exp_avg"].shape)
            if got != tuple(shape):
                raise ValueError(
                    f"optimizer moment of {name!r} has shape {got} but the parameter has shape {tuple(shape)}; "
                    "the optimizer state belongs to another model or adapter."
                )

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> AdamState:
        """From a live torch optimizer (an accelerate ``AcceleratedOptimizer`` is unwrapped)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        moments, betas, eps = {}, (0.9, 0.999), 1e-8
        for group in optimizer.param_groups:
            betas = group.get("betas", betas)
            eps = group.get("eps", eps)
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or p.requires_grad is False:
                    continue
                if id(p) not in names:
                    raise ValueError("the optimizer holds a parameter that is not part of the model passed in.")
                moments[names[id(p)]] = {
                    "exp_avg": state["exp_avg"],
                    "exp_avg_sq": state["exp_avg_sq"],
                    "step": _step_value(state.get("step", 0)),
                }
        return cls(moments, betas=betas, eps=eps, source=type(optimizer).__name__)

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike, model: torch.nn.Module) -> AdamState:
        """From a ``transformers.Trainer`` checkpoint folder (``optimizer.pt``).

        The optimizer's integer parameter ids are mapped to names the way ``Trainer.create_optimizer`` built its
        groups: the weight-decay group (``Trainer.get_decay_parameter_names``) first, then the rest, each in
        ``model.named_parameters()`` order, trainable parameters only. Shapes are checked against the model.
        """
        from transformers import Trainer

        path = os.path.join(os.fspath(folder), "optimizer.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: pass a Trainer checkpoint folder (checkpoint-N) saved with the optimizer "
                "state (save_only_model=False), or a mapping name -> {{'exp_avg', 'exp_avg_sq'}}."
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        decay = set(Trainer.get_decay_parameter_names(None, model))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ordered = [n for n, _ in trainable if n in decay] + [n for n, _ in trainable if n not in decay]
        group_ids = [pid for group in saved["param_groups"] for pid in group["params"]]
        if len(group_ids) != len(ordered):
            raise ValueError(
                f"{path} holds {len(group_ids)} parameters but the model has {len(ordered)} trainable ones; "
                "load the adapter of this very checkpoint (is_trainable=True) before reading its optimizer state."
            )
        group = saved["param_groups"][0]
        moments = {}
        for name, pid in zip(ordered, group_ids, strict=True):
            state = saved["state"].get(pid)
            if state is None:
                continue
            moments[name] = {
                "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"],
                "step": _step_value(state.get("step", 0)),
            }
        return cls(moments, betas=group.get("betas", (0.9, 0.999)), eps=group.get("eps", 1e-8), source=path)


def _step_value(step) -> int:
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def checkpoint_learning_rate(folder: str | os.PathLike) -> float | None:
    """The learning rate a Trainer logged at the checkpoint's own step (``trainer_state.json``), or ``None`` with a
    warning naming the fix. A rate logged at another step is never used: it would weight the checkpoint wrongly."""
    path = os.path.join(os.fspath(folder), "trainer_state.json")
    if not os.path.isfile(path):
        _warn_no_rate(folder, f"{path} does not exist")
        return None
    with open(path) as handle:
        state = json.load(handle)
    step = state.get("global_step")
    at_step = [e for e in state.get("log_history", []) if "learning_rate" in e and e.get("step") == step]
    if not at_step:
        _warn_no_rate(folder, f"its trainer_state.json logged no learning rate at step {step} (make logging_steps "
                              "divide save_steps to have one)")
        return None
    return float(at_step[-1]["learning_rate"])


def _warn_no_rate(folder, why: str) -> None:
    if is_main_process():
        logger.warning(
            "%s: no learning rate for this checkpoint: %s. Influence weights checkpoints by their learning rates; "
            "pass learning_rate= (--learning-rate) to record it, or checkpoint_weights= to compute_influence.",
            os.fspath(folder), why,
        )


def resolve_optimizer_state(optimizer_state, model: torch.nn.Module) -> AdamState:
    """An :class:`AdamState` from a Trainer checkpoint folder (``optimizer.pt``), a live torch optimizer, a mapping
    ``parameter name -> {"exp_avg", "exp_avg_sq"[, "step"]}`` or an ``AdamState``."""
    if isinstance(optimizer_state, AdamState):
        return optimizer_state
    if isinstance(optimizer_state, (str, os.PathLike)):
        return AdamState.from_checkpoint(optimizer_state, model)
    if isinstance(optimizer_state, torch.optim.Optimizer) or hasattr(optimizer_state, "param_groups"):
        return AdamState.from_optimizer(optimizer_state, model)
    if isinstance(optimizer_state, Mapping):
        return AdamState(optimizer_state)
    raise TypeError(
        f"optimizer_state of type {type(optimizer_state).__name__} is not supported; pass a Trainer checkpoint "
        "folder, a torch optimizer, or a mapping name -> {'exp_avg', 'exp_avg_sq'}."
    )


class Preconditioner:
    """Maps a batch of per-example gradients of one parameter to features with the registered feature type
    ``feature`` (:data:`icons_hf.features.FEATURE_TYPES`); ``settings`` are the :class:`FeatureSettings` (its
    ``adam_variant`` for ``"adam"``), ``state`` the optimizer state a feature type may need."""

    def __init__(self, feature: str, settings: FeatureSettings | None = None, state: AdamState | None = None,
                 device="cpu"):
        validate_choice("feature", feature, FEATURE_TYPES)
        entry = FEATURE_TYPES[feature]
        if entry.needs_optimizer_state and state is None:
            raise ValueError(
                f"feature={feature!r} needs optimizer_state: a Trainer checkpoint folder, a live optimizer, or a "
                "mapping name -> {'exp_avg', 'exp_avg_sq'}."
            )
        self.feature = feature
        self.state = state
        self.device = torch.device(device)
        self.method = entry.build(state=state, settings=settings or FeatureSettings(), device=self.device)

    def describe(self) -> dict:
        return {"feature": self.feature, **self.method.describe()}

    def __call__(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        return self.method(name, grads)
