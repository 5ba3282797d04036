"""Per-example gradient features: capture, preconditioning, projection and extraction."""

from .capture import LinearCapture
from .extractor import BadRowError, collate_rows, compute_gradients, per_row_loss
from .precondition import ADAM_VARIANTS, FEATURES, AdamState, Preconditioner
from .projection import PROJECTIONS, Projector

__all__ = [
    "ADAM_VARIANTS",
    "FEATURES",
    "PROJECTIONS",
    "AdamState",
    "BadRowError",
    "LinearCapture",
    "Preconditioner",
    "Projector",
    "collate_rows",
    "compute_gradients",
    "per_row_loss",
]
