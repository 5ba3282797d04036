"""Exact match: the share of predictions equal to their reference (to any of them, when several are given).

Options make the comparison forgiving in controlled ways: ``ignore_case`` lower-cases both sides,
``ignore_punctuation`` deletes ASCII punctuation, ``strip`` (default) removes leading and trailing whitespace
and ``normalize_whitespace`` collapses inner runs of whitespace to one space.
"""

import string

import datasets
import evaluate

_DESCRIPTION = """\
Exact match rate of predictions against one or several references per example, with optional case,
punctuation and whitespace normalisation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted strings.
    references (`list` of `str` or `list` of `list` of `str`): the reference(s) of each prediction; a
        prediction matches when it equals any of its references.
    ignore_case (`bool`, default `False`): compare lower-cased strings.
    ignore_punctuation (`bool`, default `False`): delete ASCII punctuation before comparing.
    strip (`bool`, default `True`): remove leading and trailing whitespace before comparing.
    normalize_whitespace (`bool`, default `False`): collapse inner whitespace runs to one space.
Returns:
    exact_match (`float`): share of matching predictions, in [0, 1].
Examples:
    >>> metric = icons_hf.metrics.load_metric("exact_match")
    >>> metric.compute(predictions=["Yes", "no"], references=["yes", "yes"], ignore_case=True)
    {'exact_match': 0.5}
"""

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _normalise(text, ignore_case, ignore_punctuation, strip, normalize_whitespace):
    text = str(text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if normalize_whitespace:
        text = " ".join(text.split())
    elif strip:
        text = text.strip()
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        ignore_case=False,
        ignore_punctuation=False,
        strip=True,
        normalize_whitespace=False,
    ):
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; give one each.")
        if not predictions:
            raise ValueError("no predictions were given; add_batch() or pass predictions= and references=.")
        options = (ignore_case, ignore_punctuation, strip, normalize_whitespace)
        hits = 0
        for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs:
                raise ValueError(f"example {i} has no reference; give at least one.")
            prediction = _normalise(prediction, *options)
            hits += any(prediction == _normalise(r, *options) for r in refs)
        return {"exact_match": hits / len(predictions)}
