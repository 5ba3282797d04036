"""VQA accuracy: the open-ended visual question answering metric of VQA v1/v2, GQA-style single answers too.

Answers are normalised before comparison: lower case, whitespace collapsed, commas inside numbers removed
("1,000" -> "1000"), periods dropped unless a digit follows ("3.5" stays), apostrophes dropped ("don't" ->
"dont"), every other punctuation mark turned into a space, the articles a/an/the dropped and the number words
none/zero..ten written as digits.

With several reference (human) answers per question, a prediction scores min(#matching references / 3, 1):
three or more annotators agreeing gives full credit. With ``leave_one_out=True`` the score is instead the mean
of that quantity over the subsets that leave out one reference each, as the VQA evaluation server reports.
With one reference, the score is 1 for a normalised match and 0 otherwise.
"""

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{antol2015vqa,
  title     = {{VQA}: Visual Question Answering},
  author    = {Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
               Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year      = {2015}
}
"""

_DESCRIPTION = """\
VQA accuracy of predicted answers against one or several reference answers per question, after the standard
answer normalisation (case, punctuation, articles, number words). Several references: min(#matches / 3, 1).
One reference: normalised exact match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers, one per question.
    references (`list` of `str` or `list` of `list` of `str`): the reference answer(s) of each question
        (VQA v2 has ten human answers per question).
    leave_one_out (`bool`, default `False`): average min(#matches / 3, 1) over the subsets that leave out one
        reference each (the VQA evaluation server's variant) instead of using all references at once.
Returns:
    vqa_accuracy (`float`): mean accuracy over the questions, in [0, 1].
Examples:
    >>> metric = icons_hf.metrics.load_metric("vqa_accuracy")
    >>> metric.compute(predictions=["Two", "red"], references=[["2", "2", "2", "3"], ["blue"]])
    {'vqa_accuracy': 0.5}
"""

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset(("a", "an", "the"))
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_OTHER_PUNCT = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")


def normalize_answer(text):
    """The normalised form of an answer (see the module docstring)."""
    text = " ".join(str(text).split()).lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PERIOD.sub(" ", text)
    text = text.replace("'", "")
    text = _OTHER_PUNCT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def question_accuracy(prediction, references, leave_one_out=False):
    """VQA accuracy of one prediction against its (already normalised) reference answers."""
    if len(references) == 1:
        return float(prediction == references[0])
    if not leave_one_out:
        return min(sum(ref == prediction for ref in references) / 3.0, 1.0)
    matches = [ref == prediction for ref in references]
    total = sum(matches)
    # Leaving out reference i removes one match when reference i matched.
    return sum(min((total - m) / 3.0, 1.0) for m in matches) / len(references)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references, leave_one_out=False):
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; give one each.")
        if not predictions:
            raise ValueError("no predictions were given; add_batch() or pass predictions= and references=.")
        scores = []
        for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs:
                raise ValueError(f"question {i} has no reference answer; give at least one.")
            scores.append(
                question_accuracy(normalize_answer(prediction), [normalize_answer(r) for r in refs], leave_one_out)
            )
        return {"vqa_accuracy": float(sum(scores) / len(scores))}
