"""Answer normalisation and the metrics the benchmarks share.

VQA accuracy, min(#matching humans / 3, 1) averaged over leaving each human out, exists in
several implementations that disagree on edge cases. Each is reproduced here exactly, quirks
included, and named for its source (`VQA_ACCURACY` maps the names); `tests/fixtures/scorers/vqa/`
holds the outputs of running each source on thousands of generated cases:

- `official` (the default): GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`,
  master, commit a013f0043c1e "Fixed processing answers bug". Normalises the prediction and the
  human answers only when the humans disagree, then compares case-sensitively.
- `evalai`: Cloud-CV/VQA-Evaluation `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, commit
  7a042f5bde54 (the code behind the EvalAI VQA challenge server). Always normalises the prediction;
  the human answers get punctuation processing only, and only when they disagree. LAVIS's
  `vqa_eval.py` (bundled with the original TinyGPT-V as `minigpt4/common/vqa_tools/vqa_eval.py`)
  behaves the same.
- `original`: the copy the original TinyGPT-V's `eval_vqa.py` imports for OK-VQA,
  DLYuanGod/TinyGPT-V `minigpt4/common/vqa_tools/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py`,
  commit 83f6189b062c: `official` with a lower-cased comparison.
- `lenient`: ours; always normalises both sides. NOT comparable with published numbers: it
  forgives what every official scorer counts wrong ("Yes." against ten "yes").

Quirks every source shares, reproduced: the period rule passes `re.UNICODE` (32) as the `count`
argument of `re.sub`, so at most 32 periods are removed; a punctuation mark is deleted rather
than replaced by a space when it touches a space or when the text holds a "1,000"-style number;
`\\d` follows Python 3 (any Unicode digit; the scripts were written for Python 2, where only
ASCII digits count). Leave-one-out subsets are formed by position; the scripts compare answer
dicts, which is the same whenever answer ids differ, as in every official annotation file.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# --- VQA answer normalisation (the tables every VQA scorer shares) ------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# "none" -> "0" is in the official table: "none" and "0" count as the same answer.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The sources' pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a look-ahead that never fails
# before a ".", so it removes every period not followed by a digit ("3.5" keeps its point).
_PERIOD = re.compile(r"\.(?!\d)")
# The sources call periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_MAX_PERIODS_REMOVED = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The sources' processPunctuation: marks deleted or turned into spaces, then periods.

    A mark touching a space, or any mark in a text holding a "1,000"-style number, is deleted;
    otherwise it becomes a space ("t-shirt" -> "t shirt"). The conditions look at the input text.
    At most 32 periods not followed by a digit are removed (the `count` quirk)."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The sources' processDigitArticle: lower-case, number words to digits, drop articles,
    restore contractions, single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _flatten_whitespace(text: str) -> str:
    """What every source does first to an answer: newlines and tabs to spaces, then strip()."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """The full VQA answer normalisation: 'The Two Dogs.' -> '2 dogs'."""
    return process_digit_article(process_punctuation(_flatten_whitespace(text)))


# --- VQA accuracy -----------------------------------------------------------------------------

def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#matches among the other humans / 3, 1), averaged over leaving each human out."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    per_subset = [min(1.0, (total - own) / 3) for own in matches]
    return sum(per_subset) / len(per_subset)


def _humans_disagree(answers: Sequence[str]) -> bool:
    return len(set(answers)) > 1


def vqa_accuracy_official(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as GT-Vision-Lab/VQA computes it (vqaEval.py, master, commit a013f0043c1e).

    Both sides are whitespace-flattened; only when the (flattened) human answers differ are both
    normalised; the comparison is case-sensitive. So "yes." and "Yes" score 0 against ten "yes",
    but 0.9 against three "yes" and seven "no"."""
    prediction = _flatten_whitespace(prediction)
    answers = [_flatten_whitespace(a) for a in answers]
    if _humans_disagree(answers):
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    return _leave_one_out_accuracy(prediction, answers)


def vqa_accuracy_original(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the copy bundled with the original TinyGPT-V computes it (the one its
    eval_vqa.py imports for OK-VQA: minigpt4/common/vqa_tools/VQA/PythonEvaluationTools/
    vqaEvaluation/vqaEval.py, DLYuanGod/TinyGPT-V commit 83f6189b062c).

    `official` with a lower-cased comparison: "Yes" scores 1 against ten "yes", "yes." still 0."""
    prediction = _flatten_whitespace(prediction)
    answers = [_flatten_whitespace(a) for a in answers]
    if _humans_disagree(answers):
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    return _leave_one_out_accuracy(prediction.lower(), [a.lower() for a in answers])


def vqa_accuracy_evalai(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the EvalAI server computes it (Cloud-CV/VQA-Evaluation vqaEval.py,
    commit 7a042f5bde54; LAVIS's vqa_eval.py is the same).

    The prediction is always flattened and fully normalised. The human answers are used as
    stored (not even stripped); when they differ they get punctuation processing only, no
    lower-casing, digits or articles. Case-sensitive comparison."""
    prediction = normalize_vqa_answer(prediction)
    if _humans_disagree(answers):
        answers = [process_punctuation(a) for a in answers]
    return _leave_one_out_accuracy(prediction, list(answers))


def vqa_accuracy_lenient(prediction: str, answers: Sequence[str]) -> float:
    """Ours, NOT comparable with published numbers: prediction and human answers are always
    fully normalised, whatever the humans said."""
    return _leave_one_out_accuracy(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])


# The default first. Benchmarks scored by VQA accuracy offer each of these as a scoring.
VQA_ACCURACY: dict[str, Callable[[str, Sequence[str]], float]] = {
    "official": vqa_accuracy_official,
    "evalai": vqa_accuracy_evalai,
    "original": vqa_accuracy_original,
    "lenient": vqa_accuracy_lenient,
}
vqa_accuracy = vqa_accuracy_official  # the default scorer


# --- yes/no and true/false answers ----------------------------------------------------------------

def parse_polarity(text: str, positive: set[str], negative: set[str]) -> bool | None:
    """True/False when the answer's words contain only positive or only negative words, else None.

    Whole words after VQA normalisation: "Yes, it is." -> True, "not sure" -> None,
    "yes and no" -> None (both)."""
    words = set(normalize_vqa_answer(text).split())
    said_yes, said_no = bool(words & positive), bool(words & negative)
    if said_yes == said_no:
        return None
    return said_yes


def parse_yes_no(text: str) -> bool | None:
    return parse_polarity(text, {"yes"}, {"no"})


def parse_true_false(text: str) -> bool | None:
    return parse_polarity(text, {"true", "yes"}, {"false", "no"})


# --- ranking and boxes: tinygpt_v.evaluation.scoring (re-exported here) ----------------------------

def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve, ties counting one half: `scoring.roc_auc` (exact against
    sklearn's `roc_auc_score`), arguments in this module's historical order."""
    from .scoring import roc_auc
    return roc_auc(labels, scores)


_IN_SCORING = {"GRID", "parse_grid_box", "grid_to_pixels", "box_iou", "box_iou_original"}


def __getattr__(name: str):
    # Box helpers live in scoring.py (which imports this module): resolved on first use.
    if name in _IN_SCORING:
        from . import scoring
        return getattr(scoring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mean_percent(values: Sequence[float]) -> float:
    """Mean of per-sample scores in [0, 1], as a percentage (0 for no samples)."""
    return 100.0 * sum(values) / len(values) if values else 0.0
