"""Evaluation metrics for judging a selection downstream, as ``evaluate`` modules shipped inside the package.

They load by path, so they work offline (``HF_HUB_OFFLINE=1``)::

    from icons_hf.metrics import load_metric

    vqa = load_metric("vqa_accuracy")
    vqa.compute(predictions=["two"], references=[["2", "2", "two", "3"]])   # {'vqa_accuracy': 1.0}

``evaluate.load(icons_hf.metrics.metric_path("exact_match"))`` is the same thing.
"""

from __future__ import annotations

import os

METRICS = ("exact_match", "vqa_accuracy")
_HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """The folder of a shipped metric module (what ``evaluate.load`` takes)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; icons_hf ships: {', '.join(METRICS)}.")
    path = os.path.join(_HERE, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise FileNotFoundError(
            f"{path}/{name}.py is missing; reinstall icons_hf (the metric modules are package data)."
        )
    return path


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric by path; keyword arguments go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
