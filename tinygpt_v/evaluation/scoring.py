"""Per-sample scoring rules of GQA, VizWiz, IconQA, Hateful Memes, RefCOCO/+/g and VSR.

Two families, each exact against the code it names (tests/test_eval_scorers_benchmarks.py compares
them with outputs of that code, made by tests/fixtures/make_benchmark_scorer_fixtures.py):

- `*_official`: the benchmark's own evaluation code;
- `*_original`: the reply clean-up and rule of the original TinyGPT-V evaluation scripts
  (DLYuanGod/TinyGPT-V at commit 83f6189b062ccfb41aeb839559eb392bdbbaf0e6: `eval_vqa.py`,
  `eval_scripts/eval_vqa.py`, `eval_ref.py`), each in its own order. Those scripts receive the
  reply from the original's `generate`, which already cut `</s>`, removed `<s>`, kept what
  follows `[/INST]` and stripped; generation there does not stop at `###`, so a reply may hold
  text after it.

Where the original's scripts disagree or are broken, the function's docstring says which one we
follow and what the defect is.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .metrics import _ARTICLES, _CONTRACTIONS, _NUMBER_WORDS, process_punctuation

# --- GQA ------------------------------------------------------------------------------------------


def gqa_official(prediction: str, answer: str) -> float:
    """GQA's `eval.py` (https://cs.stanford.edu/people/dorarad/gqa/evaluate.html; public copy:
    SHI-Labs/VCoder `playground/data/eval/gqa/data/eval/eval.py`, commit 2f95684): the
    prediction as submitted must equal the gold answer (`predicted == gold`): no lower-casing,
    no stripping, no normalisation."""
    return float(prediction == answer)


def gqa_original(reply: str, label: str) -> float:
    """`eval_vqa.py` (gqa): correct when the label occurs in the lower-cased raw reply
    (`label in answer.lower()`), text after `###` included; "no" is found in "not sure"."""
    return float(label in reply.lower())


# --- VizWiz ---------------------------------------------------------------------------------------

# The VizWiz-VQA API's contraction table is the VQA one written with typographic apostrophes
# (U+2019), except these entries, kept as in the VQA table...
_VIZWIZ_STRAIGHT = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
# ...and these keys, which keep a straight apostrophe while their values are typographic.
_VIZWIZ_STRAIGHT_KEY = {"couldn'tve", "hadn'tve"}


def _typographic(text: str) -> str:
    return text.replace("'", "\u2019")


_VIZWIZ_CONTRACTIONS = {
    (k if k in _VIZWIZ_STRAIGHT or k in _VIZWIZ_STRAIGHT_KEY else _typographic(k)):
        (v if k in _VIZWIZ_STRAIGHT else _typographic(v))
    for k, v in _CONTRACTIONS.items()}

def normalize_vizwiz(text: str) -> str:
    """The VizWiz-VQA API's prediction normalisation (`vqaEval.py`: processPunctuation, then
    processDigitArticle with its own contraction table)."""
    # the VQA processPunctuation, its 32-period quirk included
    text = process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_VIZWIZ_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vizwiz_official(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz-VQA API `vqaEval.py` (Qing Li; vizwiz.org, VQA task "Annotations and APIs"), its
    `evaluate`: the prediction is normalised, the human answers are compared AS STORED (no
    normalisation, case-sensitive); min(#matching other humans / 3, 1) averaged over leaving
    each human out (by position)."""
    if not answers:
        raise ValueError("VizWiz accuracy needs at least one human answer")
    prediction = normalize_vizwiz(prediction)
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(matches)


def vizwiz_answerable(prediction: str) -> int:
    """Our reading of a reply as the `answerable` field the API's `evaluate_unanswerability`
    expects: 0 when the normalised reply is "unanswerable", else 1."""
    return int(normalize_vizwiz(prediction) != "unanswerable")


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """sklearn's `average_precision_score` (binary): sum over distinct score thresholds,
    highest first, of (recall step) x precision."""
    positives = sum(labels)
    if positives == 0:
        raise ValueError("average precision needs at least one positive label")
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    ap, tp, fp, last_recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(pairs):
        threshold = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == threshold:
            tp += pairs[i][1]
            fp += 1 - pairs[i][1]
            i += 1
        recall = tp / positives
        ap += (recall - last_recall) * (tp / (tp + fp))
        last_recall = recall
    return ap


def f1_binary(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """sklearn's `f1_score` for 0/1 labels (0 where it is undefined, as sklearn's default)."""
    tp = sum(1 for y, p in zip(labels, predicted) if y and p)
    denominator = sum(labels) + sum(predicted)
    return 2 * tp / denominator if denominator else 0.0


def vizwiz_unanswerability(answerable_gold: Sequence[int], answerable_pred: Sequence[int]) -> dict[str, float]:
    """`evaluate_unanswerability`: average precision and F1 (prediction > 0.5) of the
    UNanswerable class, in percent."""
    gold = [1 - int(a) for a in answerable_gold]
    pred = [1.0 - float(a) for a in answerable_pred]
    return {"average_precision": 100.0 * average_precision(gold, pred),
            "f1": 100.0 * f1_binary(gold, [int(p > 0.5) for p in pred])}


def vizwiz_original(reply: str, answers: Sequence[str]) -> float:
    """`eval_vqa.py` (vizwiz): the reply is cut at `###` and after `Assistant:` and stripped
    (case-sensitive, as written); the human answers are joined with `_` and split again, so an
    answer holding `_` counts as several; each piece counts when it equals the reply or either
    contains the other (lower-cased); min(count / 3, 1), without leave-one-out. An empty reply
    is inside every answer."""
    reply = reply.split("###")[0].split("Assistant:")[-1].strip().lower()
    pieces = "_".join(answers).split("_")
    count = sum(1 for gt in pieces if gt.lower() == reply or gt.lower() in reply or reply in gt.lower())
    return min(count / 3.0, 1.0)


# --- IconQA ---------------------------------------------------------------------------------------


def iconqa_chosen_index(prediction: str, options: Sequence[str]) -> int:
    """The option a stored prediction names: the first option equal to it (-1: none).

    With likelihood ranking the prediction is the top-ranked option; equal option strings get
    equal scores and the first of them wins the argmax, so the first match is the chosen index."""
    return list(options).index(prediction) if prediction in options else -1


def iconqa_official(chosen: int, answer: int) -> float:
    """IconQA `run_choose_txt/eval.py` (lupantech/IconQA, commit bcb414c), `compute_test_acc`:
    the argmax option index must equal the gold index (`pred_ans == int(data['answer'])`)."""
    return float(chosen == int(answer))


def iconqa_original_candidates(choices: Sequence[str]) -> list[str]:
    """The candidates the original ranks: `'_'.join(choices)` (dataset) split on `_`
    (`eval_scripts/eval_vqa.py`): an option holding `_` becomes several candidates."""
    return "_".join(choices).split("_")


def iconqa_original(prediction: str, choices: Sequence[str], answer: int) -> float:
    """`eval_scripts/eval_vqa.py` (iconvqa): the top-ranked candidate's index in the `_`-split
    candidate list must equal the gold index (`answer_ranks[idx][0] == answer`).

    The root `eval_vqa.py` is broken and not followed: it splits on `|` (the dataset joins with
    `_`, so every question has ONE candidate, always ranked first) and then tests
    `int in tensor` / `tensor in int`, which raises TypeError on the first question whose gold
    index is not 0."""
    return float(iconqa_chosen_index(prediction, iconqa_original_candidates(choices)) == int(answer))


# --- Hateful Memes --------------------------------------------------------------------------------


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """sklearn's `roc_auc_score` (binary): P(score of a positive > score of a negative), ties
    counting one half (trapezoids through tied thresholds)."""
    positives = sum(1 for y in labels if y == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs at least one positive and one negative label")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, start = 0.0, 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1
        rank_sum += average_rank * sum(1 for i in order[start:end + 1] if labels[i] == 1)
        start = end + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def accuracy_at_half(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Accuracy of the labels predicted at threshold 0.5 (`score > 0.5` is hateful), in [0, 1]:
    sklearn's `accuracy_score(labels, scores > 0.5)`."""
    return sum(int(score > 0.5) == int(label) for label, score in zip(labels, scores)) / len(labels)


def hateful_memes_original(reply: str, label: int) -> float:
    """`eval_vqa.py` (hm): cut at `###` and after `Assistant:` (case-sensitive), strip; "yes"
    anywhere in the lower-cased reply -> 1, else "no" anywhere -> 0 ("not", "know", "none"
    count), else the reply itself, which never equals the label."""
    reply = reply.split("###")[0].split("Assistant:")[-1].strip().lower()
    said = 1 if "yes" in reply else 0 if "no" in reply else None
    return float(said is not None and said == int(label))


# --- VSR ------------------------------------------------------------------------------------------


def vsr_original(reply: str, label: int) -> float:
    """Root `eval_vqa.py` (vsr): the label word ("true" for 1, "false" for 0) must occur in the
    lower-cased raw reply (`label.lower() in answer.lower()`), text after `###` included.

    `eval_scripts/eval_vqa.py` adds a second rule and is not followed: it also counts "yes"
    (label true) or "no" (label false) in the reply, so one sample can score 2 and the accuracy
    can pass 100 %."""
    return float(("true" if int(label) == 1 else "false") in reply.lower())


# --- RefCOCO / RefCOCO+ / RefCOCOg ----------------------------------------------------------------

GRID = 100  # MiniGPT-v2 boxes are written on a 0..100 grid: {<x1><y1><x2><y2>}
_BOX = re.compile(r"\{\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*\}")
_INTEGER = re.compile(r"\d+")
_ORIGINAL_BOX_START = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


def parse_grid_box(text: str) -> tuple[int, int, int, int] | None:
    """The box of a reply, for the official Acc@0.5: the first `{<x1><y1><x2><y2>}` (spaces
    allowed); None when there is none or the reply holds more than four numbers (the original
    scores those as misses). Coordinates above 100 are kept and scaled like the others, as the
    original does (the box then reaches past the image)."""
    match = _BOX.search(text)
    if match is None or len(_INTEGER.findall(text)) > 4:
        return None
    return tuple(int(v) for v in match.groups())  # type: ignore[return-value]


def grid_to_pixels(box: Sequence[float], width: float, height: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in continuous coordinates; a box with x2 <= x1 or
    y2 <= y1 (inverted or degenerate) gives 0."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def refcoco_official(reply: str, bbox_xywh: Sequence[float], width: float, height: float) -> float:
    """Acc@0.5, the RefCOCO metric of MiniGPT-v2 / Shikra-style grounding papers: a hit when
    the IoU of the predicted box (grid -> pixels) with the gold box is >= 0.5. No reply raises:
    no box, more than four numbers, or an inverted/degenerate box is a miss."""
    box = parse_grid_box(reply)
    if box is None:
        return 0.0
    x, y, w, h = bbox_xywh
    return float(box_iou(grid_to_pixels(box, width, height), [x, y, x + w, y + h]) >= 0.5)


def box_iou_original(a: Sequence[float], b: Sequence[float]) -> float:
    """`minigpt4/common/eval_utils.computeIoU`: inclusive pixel coordinates (+1 per side),
    no check of the box; raises ZeroDivisionError when the union is 0."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def refcoco_original(reply: str, bbox_xywh: Sequence[float], width: float, height: float) -> float:
    """`eval_ref.py` (root; `eval_scripts/eval_ref.py` scores the same way): remove `<unk>` and
    every space, strip; the reply must START with `{<d><d><d><d>}` (1-3 digits each); then ALL
    integers of the reply are the box, so more than four is a miss (the script's unpacking
    raises and its bare `except` skips the sample); scaled by width/height / 100; hit when the
    inclusive-pixel IoU is > 0.5; a zero union (ZeroDivisionError) is a miss."""
    reply = reply.replace("<unk>", "").replace(" ", "").strip()
    if not _ORIGINAL_BOX_START.match(reply):
        return 0.0
    numbers = [int(v) for v in _INTEGER.findall(reply)]
    if len(numbers) != 4:
        return 0.0
    x, y, w, h = bbox_xywh
    try:
        iou = box_iou_original(grid_to_pixels(numbers, width, height), [x, y, x + w, y + h])
    except ZeroDivisionError:
        return 0.0
    return float(iou > 0.5)
