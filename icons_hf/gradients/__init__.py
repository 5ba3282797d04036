"""Per-example gradient features: capture, preconditioning, projection and extraction."""

from .badrows import BadRowError
from .capture import LinearCapture
from .extractor import compute_gradients
from .inputs import collate_rows, unwrap_model
from .loss import per_row_loss
from .precondition import AdamState, Preconditioner, resolve_optimizer_state
from .projection import Projector

__all__ = [
    "AdamState",
    "BadRowError",
    "LinearCapture",
    "Preconditioner",
    "Projector",
    "collate_rows",
    "compute_gradients",
    "per_row_loss",
    "resolve_optimizer_state",
    "unwrap_model",
]
