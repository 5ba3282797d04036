"""Per-example gradients of linear layers from captured activations.

For a linear map ``y = x W^T + b`` applied to the tokens of one example, the gradient of that example's loss is
``dW = sum_t dy_t x_t^T`` and ``db = sum_t dy_t``. A forward hook keeps ``x`` and puts a gradient hook on the
output ``y``; during the backward pass that hook receives ``dL/dy`` and reduces it at once to the per-example
``dW`` (one batched matrix product per layer call), so neither the output gradients of all layers nor the full
per-example gradient vector are ever held together. Because the total loss is the sum of per-example losses and
examples never interact inside the model, ``dy`` of row ``i`` is exactly the gradient of row ``i``'s own loss.

The backward pass is ``torch.autograd.grad`` with respect to the trainable parameters: the summed gradients it
returns are dropped and parameter ``.grad`` fields are never written, so a training run's state is left alone.
Products are formed in float32 whatever the model's dtype.

Every trainable parameter (with ``parameters="lora"``: every trainable LoRA parameter; other trainable ones are
then left out) must be the ``weight`` or ``bias`` of an ``nn.Linear`` (true for LoRA adapters of
peft, whose ``lora_A``/``lora_B`` are linear layers). Anything else is reported by name. Each call of a layer
must keep one leading batch dimension per example (true for the language model of HF causal LMs and VLMs; not
for vision towers that pack the patches of all images into one sequence, such as Qwen2-VL's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LORA_MARK = "lora_"  # peft names its adapter parameters lora_A / lora_B (lora_embedding_A/B, lora_magnitude...)

CHECKPOINT_HINT = (
    "If the model uses gradient checkpointing with use_reentrant=True (or torch.utils.checkpoint without "
    "use_reentrant), enable it with gradient_checkpointing_kwargs={'use_reentrant': False}: reentrant checkpointing "
    "runs the forward pass without autograd, so the layer outputs cannot be captured."
)


@dataclass
class _Site:
    module: nn.Linear
    weight: str | None  # parameter name of the weight, when trainable
    bias: str | None
    seen: int = 0  # forward calls in the current batch, captured or not
    calls: int = 0  # captured forward calls in the current batch
    pending: int = 0  # captured calls whose output gradient has not arrived yet
    dw: torch.Tensor | None = None
    db: torch.Tensor | None = None
    done: bool = False

    def reset(self) -> None:
        self.seen = self.calls = self.pending = 0
        self.dw = self.db = None
        self.done = False


class LinearCapture:
    """Hooks the linear layers that own the model's trainable parameters.

    Use as a context manager around one forward pass, then call :meth:`backward` with the summed per-example loss
    and a callback that receives ``(parameter name, batch x numel float32 gradients)`` once per parameter.
    """

    def __init__(self, model: nn.Module, parameters: str = "trainable"):
        self.model = model
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if parameters == "lora":  # the released ICONS code: gradients of LoRA parameters only
            trainable = {n: p for n, p in trainable.items() if LORA_MARK in n}
            if not trainable:
                raise ValueError(
                    f"parameters='lora' but the model has no trainable LoRA parameter (a name holding {LORA_MARK!r}); "
                    "attach a peft LoRA adapter, or use parameters='trainable'."
                )
        elif parameters != "trainable":
            raise ValueError(f"parameters={parameters!r} is not supported; choose 'trainable' or 'lora'.")
        if not trainable:
            raise ValueError("the model has no trainable parameters; attach a LoRA adapter (peft) or unfreeze layers.")
        owners: set[int] = set()
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
                owners.add(id(module))
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
        self._params = [trainable[n] for n in self.parameter_names]
        self._handles = []
        self._active = False
        self._batch_size = 0
        self._consume: Callable[[str, torch.Tensor], None] | None = None

    def __enter__(self):
        for site in self.sites:
            site.reset()
            self._handles.append(site.module.register_forward_hook(self._forward_hook(site)))
        self._active = True
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        self._consume = None
        for site in self.sites:
            site.reset()
        return False

    def _forward_hook(self, site: _Site):
        def hook(module, inputs, output):
            # Only the first forward is captured: a recomputation (gradient checkpointing) during the backward
            # pass runs the hook again with capture already closed.
            if not self._active:
                return None
            site.seen += 1
            if not (torch.is_grad_enabled() and output.requires_grad):
                return None
            site.calls += 1
            site.pending += 1
            held = [inputs[0].detach()]  # released as soon as the output gradient has been used

            def on_grad(grad):
                self._on_output_grad(site, held.pop(), grad)

            output.register_hook(on_grad)
            return None

        return hook

    def _on_output_grad(self, site: _Site, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch = self._batch_size
        if x.shape[0] != batch or grad.shape[0] != batch:
            raise RuntimeError(
                f"layer owning {site.weight or site.bias!r} saw a batch of {x.shape[0]} rows for {batch} examples; "
                "per-example features need one leading batch dimension per example (LoRA on a vision tower that "
                "packs all images into one sequence is not supported: target the language model only)."
            )
        with torch.no_grad():
            g32 = grad.reshape(batch, -1, grad.shape[-1]).to(torch.float32)
            if site.weight:
                x32 = x.reshape(batch, -1, x.shape[-1]).to(torch.float32)
                part = torch.bmm(g32.transpose(1, 2), x32)
                site.dw = part if site.dw is None else site.dw.add_(part)
            if site.bias:
                part = g32.sum(dim=1)
                site.db = part if site.db is None else site.db.add_(part)
        site.pending -= 1
        if site.pending == 0:
            self._finalize(site)

    def _finalize(self, site: _Site) -> None:
        site.done = True
        batch = self._batch_size
        device = site.module.weight.device
        if site.weight:
            dw = site.dw if site.dw is not None else torch.zeros(batch, *site.module.weight.shape, device=device)
            self._consume(site.weight, dw.reshape(batch, -1))
        if site.bias:
            db = site.db if site.db is not None else torch.zeros(batch, site.module.bias.shape[0], device=device)
            self._consume(site.bias, db)
        site.dw = site.db = None

    def backward(self, loss: torch.Tensor, batch_size: int, consume: Callable[[str, torch.Tensor], None]) -> None:
        """Back-propagate the summed per-example ``loss`` and hand each parameter's per-example gradients
        (``batch_size x numel``, float32) to ``consume``, layer by layer as the backward pass reaches them.
        A parameter whose layer received no gradient gets zeros. Parameter ``.grad`` fields are not touched."""
        self._active = False
        # A layer the batch never ran (e.g. a trainable image projector on text-only rows) has a zero gradient;
        # a layer that ran without autograd, or no layer at all, means features would be wrong.
        none_seen = not any(s.seen for s in self.sites)
        unused = [site for site in self.sites if site.calls == 0 and (site.seen > 0 or none_seen)]
        if unused:
            raise RuntimeError(
                f"layer owning {unused[0].weight or unused[0].bias!r} (and {len(unused) - 1} more) was not captured "
                "in the forward pass; per-example features need every trainable layer to take part with autograd "
                f"on (is the adapter active and unmerged?). {CHECKPOINT_HINT}"
            )
        self._batch_size = int(batch_size)
        self._consume = consume
        try:
            torch.autograd.grad(loss, self._params, allow_unused=True)
            for site in self.sites:
                if not site.done:
                    self._finalize(site)
        finally:
            self._consume = None

    def per_example(self, loss: torch.Tensor, batch_size: int):
        """Yield ``(parameter name, batch x numel float32 gradients)`` for the summed per-example ``loss``
        (all parameters at once; :meth:`backward` streams them instead)."""
        collected: list[tuple[str, torch.Tensor]] = []
        self.backward(loss, batch_size, lambda name, grads: collected.append((name, grads)))
        yield from collected
