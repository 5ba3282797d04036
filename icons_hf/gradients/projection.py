"""Random projections of per-example gradients: :class:`Projector` runs the registered projection
(:data:`icons_hf.features.PROJECTIONS`; formulas and accuracy in :mod:`icons_hf.features`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..features import PROJECTIONS
from ..settings import validate_choice


class Projector:
    """Projects per-example gradients parameter by parameter and accumulates them into one feature row.

    Args:
        kind: a registered projection: ``"countsketch"``, ``"rademacher"``, ``"identity"``, ...
        dim: output dimension (ignored by a projection that does not use it, e.g. ``identity``, whose dimension is
            the parameter count).
        seed: projection seed.
        shapes: ordered mapping ``parameter name -> numel`` of the parameters that contribute.
        device: where the projection runs.
    """

    def __init__(self, kind: str, dim: int, seed: int, shapes: Mapping[str, int], device: torch.device | str = "cpu"):
        validate_choice("projection", kind, PROJECTIONS)
        self.kind = kind
        self.seed = int(seed)
        self.shapes = dict(shapes)
        self.device = torch.device(device)
        self.method = PROJECTIONS[kind].build(seed=self.seed, shapes=self.shapes, dim=dim, device=self.device)
        self.dim = int(self.method.dim)

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, **self.method.describe()}

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.dim, dtype=torch.float32, device=self.device)

    def accumulate(self, out: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        """Add the projection of ``grads`` (``batch x numel`` float32) of parameter ``name`` into ``out``."""
        if name not in self.shapes:
            raise KeyError(f"parameter {name!r} was not registered with the projector")
        self.method.accumulate(out, name, grads.reshape(grads.shape[0], -1))


__all__ = ["Projector"]
