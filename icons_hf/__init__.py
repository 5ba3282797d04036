"""ICONS (Influence Consensus) data selection for the Hugging Face stack.

Five lines with a Trainer::

    callback = IconsCallback(pool, tasks={"vqa": vqa_val, "ocr": ocr_val})
    Trainer(model, args, train_dataset=warmup, callbacks=[callback]).train()
    scores = select(compute_influence(*callback.stores()), fraction=0.2)
    export_selection("llava_v1_5_mix665k.json", scores, "llava-icons")

The defaults are the rule measured best in the replicas (README): plain-gradient train features, the balanced
specialist and equal per-task floors. The released ICONS rule is ``preset="paper"`` on every stage
(``IconsCallback``, ``compute_gradients``, ``compute_influence``, ``select``). Each stage's settings are one
dataclass in :mod:`icons_hf.settings` (``FeatureSettings``, ``InfluenceSettings``, ``SelectionSettings``).

Names are imported on first use, so ``import icons_hf`` (and the CLI's ``--help``) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "IconsCallback": "callback",
    "compute_checkpoint_stores": "checkpoints",
    "load_run": "checkpoints",
    "select": "consensus",
    "export_selection": "export",
    "compute_gradients": "gradients",
    "push_selection": "hub",
    "FeatureSettings": "settings",
    "InfluenceSettings": "settings",
    "SelectionSettings": "settings",
    "record_hash": "pools",
    "compute_influence": "influence",
    "load_gradients": "store",
    "write_report": "report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'icons_hf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
