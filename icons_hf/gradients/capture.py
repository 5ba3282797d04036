"""Per-example gradients of linear layers from captured activations.

For a linear map ``y = x W^T + b`` applied to the tokens of one example, the gradient of that example's loss is
``dW = sum_t dy_t x_t^T`` and ``db = sum_t dy_t``. A forward hook keeps ``x`` and the output ``y``; the backward
pass asks autograd for ``dL/dy`` only (``torch.autograd.grad`` with the outputs as inputs), so parameter
``.grad`` fields are never written and the training run's state is left alone. Because the total loss is the
sum of per-example losses and examples never interact inside the model, ``dy`` of row ``i`` is exactly the
gradient of row ``i``'s own loss.

Every trainable parameter must be the ``weight`` or ``bias`` of an ``nn.Linear`` (true for LoRA adapters of
peft, whose ``lora_A``/``lora_B`` are linear layers). Anything else is reported by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Site:
    module: nn.Linear
    weight: str | None  # parameter name of the weight, when trainable
    bias: str | None
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class LinearCapture:
    """Hooks the linear layers that own the model's trainable parameters.

    Use as a context manager around one forward pass, then call :meth:`per_example` with the summed loss.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("the model has no trainable parameters; attach a LoRA adapter (peft) or unfreeze layers.")
        owners: dict[int, str] = {}
        self.sites: list[_Site] = []
        claimed = set()
        for mod_name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            w = f"{prefix}weight" if module.weight.requires_grad and f"{prefix}weight" in trainable else None
            b = None
            if module.bias is not None and module.bias.requires_grad and f"{prefix}bias" in trainable:
                b = f"{prefix}bias"
            if w or b:
                if id(module) in owners:
                    continue
                owners[id(module)] = mod_name
                self.sites.append(_Site(module, w, b))
                claimed.update(x for x in (w, b) if x)
        unsupported = [n for n in trainable if n not in claimed]
        if unsupported:
            raise ValueError(
                f"trainable parameter {unsupported[0]!r} (and {len(unsupported) - 1} more) does not belong to an "
                "nn.Linear layer; per-example features support linear layers such as LoRA lora_A/lora_B. Freeze it "
                "(requires_grad=False) or leave it out of modules_to_save."
            )
        order = {n: i for i, n in enumerate(trainable)}
        self.parameter_names = sorted(claimed, key=order.__getitem__)
        self.shapes = {n: trainable[n].shape for n in self.parameter_names}
        self._handles = []
        self._active = False

    def __enter__(self):
        for site in self.sites:
            site.inputs.clear()
            site.outputs.clear()
            self._handles.append(site.module.register_forward_hook(self._hook(site)))
        self._active = True
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        for site in self.sites:
            site.inputs.clear()
            site.outputs.clear()
        return False

    def _hook(self, site: _Site):
        def hook(module, inputs, output):
            # Only the first forward is captured: a recomputation (gradient checkpointing) during the backward
            # pass runs the hook again with capture already closed.
            if self._active and torch.is_grad_enabled() and output.requires_grad:
                site.inputs.append(inputs[0].detach())
                site.outputs.append(output)

        return hook

    def per_example(self, loss: torch.Tensor, batch_size: int):
        """Yield ``(parameter name, batch x numel float32 gradients)`` for the summed per-example ``loss``."""
        self._active = False
        outputs, owners = [], []
        for site in self.sites:
            if not site.outputs:
                raise RuntimeError(
                    f"layer owning {site.weight or site.bias!r} was not used in the forward pass; per-example "
                    "features need every trainable layer to take part (is the adapter active?)."
                )
            for k, out in enumerate(site.outputs):
                outputs.append(out)
                owners.append((site, k))
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        grad_by_site: dict[int, list] = {}
        for (site, k), g in zip(owners, grads):
            grad_by_site.setdefault(id(site), []).append(g)
        for site in self.sites:
            dw, db = None, None
            for x, g in zip(site.inputs, grad_by_site[id(site)]):
                if g is None:
                    continue
                if x.shape[0] != batch_size:
                    raise RuntimeError(
                        f"layer owning {site.weight or site.bias!r} saw a batch of {x.shape[0]} rows for {batch_size} "
                        "examples; per-example features need one leading batch dimension per example."
                    )
                x32 = x.reshape(batch_size, -1, x.shape[-1]).to(torch.float32)
                g32 = g.reshape(batch_size, -1, g.shape[-1]).to(torch.float32)
                if site.weight:
                    part = torch.bmm(g32.transpose(1, 2), x32)
                    dw = part if dw is None else dw + part
                if site.bias:
                    part = g32.sum(dim=1)
                    db = part if db is None else db + part
            if site.weight:
                if dw is None:
                    dw = torch.zeros(batch_size, *site.module.weight.shape, device=loss.device)
                yield site.weight, dw.reshape(batch_size, -1)
            if site.bias:
                if db is None:
                    db = torch.zeros(batch_size, site.module.bias.shape[0], device=loss.device)
                yield site.bias, db
