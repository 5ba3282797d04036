"""ICONS (Influence Consensus) data selection for the Hugging Face stack.

Five lines with a Trainer::

    callback = IconsCallback(pool, tasks={"vqa": vqa_val, "ocr": ocr_val})
    Trainer(model, args, train_dataset=warmup, callbacks=[callback]).train()
    scores = select(compute_influence(*callback.stores()), fraction=0.2)
    export_selection("llava_v1_5_mix665k.json", scores, "llava-icons")
"""

__version__ = "0.1.0"

from .callback import IconsCallback, load_run
from .consensus import METHODS, select
from .export import export_selection
from .gradients import compute_gradients
from .hub import push_selection
from .influence import compute_influence
from .store import load_gradients

__all__ = [
    "METHODS",
    "IconsCallback",
    "__version__",
    "compute_gradients",
    "compute_influence",
    "export_selection",
    "load_gradients",
    "load_run",
    "push_selection",
    "select",
]
