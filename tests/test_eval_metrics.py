"""Metrics on hand-worked cases: VQA normalisation and accuracy, yes/no parsing, AUROC, boxes.

VQA accuracy with 10 human answers of which m match the prediction (after normalisation):
each leave-one-out subset of 9 scores min(matches/3, 1), so
m=0 -> 0, m=1 -> 9*(1/3)/10 = 0.3, m=2 -> (2*(1/3) + 8*(2/3))/10 = 0.6,
m=3 -> (3*(2/3) + 7*1)/10 = 0.9, m>=4 -> 1.
"""
import pytest

from tinygpt_v.evaluation.metrics import (auroc, box_iou, box_iou_original, grid_to_pixels, normalize_vqa_answer,
                                          parse_grid_box, parse_true_false, parse_yes_no, process_punctuation,
                                          vqa_accuracy_evalai, vqa_accuracy_lenient, vqa_accuracy_official,
                                          vqa_accuracy_original)


def humans(*counts: tuple[str, int]) -> list[str]:
    answers = [answer for answer, n in counts for _ in range(n)]
    assert len(answers) == 10
    return answers


# (prediction, human answers, accuracy worked out by hand, why): the lenient variant, which
# normalises both sides always, shows each normalisation rule on its own.
VQA_CASES = [
    ("Yes", humans(("yes", 10)), 1.0, "casing"),
    ("yes.", humans(("yes", 10)), 1.0, "trailing period removed"),
    ("two", humans(("2", 3), ("3", 7)), 0.9, "number word -> digit, m=3"),
    ("2", humans(("two", 2), ("3", 8)), 0.6, "human number words normalised too, m=2"),
    ("a dog", humans(("dog", 1), ("cat", 9)), 0.3, "article dropped, m=1"),
    ("The Red Car", humans(("red car", 4), ("blue car", 6)), 1.0, "article + casing, m=4"),
    ("dont know", humans(("don't know", 3), ("no", 7)), 0.9, "contraction restored"),
    ("t-shirt", humans(("t shirt", 2), ("shirt", 8)), 0.6, "hyphen between letters becomes a space"),
    ("1,000", humans(("1000", 3), ("100", 7)), 0.9, "comma inside a number is deleted"),
    ("yes, it is", humans(("yes it is", 1), ("yes", 9)), 0.3, "comma before a space is deleted"),
    ("none", humans(("0", 2), ("nothing", 8)), 0.6, "'none' is '0' in the official table"),
    ("", humans(("yes", 10)), 0.0, "empty answer"),
    ("3.5", humans(("3.5", 1), ("35", 9)), 0.3, "decimal point kept"),
    ("ten", humans(("10", 5), ("9", 5)), 1.0, "ten -> 10, m=5"),
    ("an apple", humans(("apple", 2), ("apples", 8)), 0.6, "plural is a different answer"),
    ("  left\n", humans(("left", 3), ("right", 7)), 0.9, "surrounding whitespace"),
    ("(a) red", humans(("red", 3), ("blue", 7)), 0.9, "brackets removed, then the article"),
    ("unanswerable", humans(("unanswerable", 2), ("blue", 8)), 0.6, "VizWiz's unanswerable is an answer"),
    ("Blue!", humans(("blue", 1), ("navy", 9)), 0.3, "exclamation mark"),
    ("whats that", humans(("what's that", 4), ("sign", 6)), 1.0, "whats -> what's"),
    ("its", humans(("it's", 3), ("yes", 7)), 0.0, "'its' is not in the contraction table"),
    ("9:30", humans(("930", 3), ("10", 7)), 0.0, "colons are not punctuation to the official script"),
    ("cat/dog", humans(("cat dog", 3), ("cat", 7)), 0.9, "slash becomes a space"),
    ("Mr. Smith", humans(("mr smith", 3), ("john", 7)), 0.9, "period before a space removed"),
    ("Two", humans(("2", 10)), 1.0, "normalised even when all humans agree"),
]


@pytest.mark.parametrize("prediction,answers,expected,why", VQA_CASES, ids=[c[3] for c in VQA_CASES])
def test_vqa_accuracy_hand_worked(prediction, answers, expected, why):
    assert vqa_accuracy_lenient(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_of_the_whole_list():
    # The 25 cases above, grouped by their hand-worked accuracy:
    # 1.0: Yes, yes., The Red Car, ten, whats that, Two -> 6
    # 0.9: two, dont know, 1,000, left, (a) red, cat/dog, Mr. Smith -> 7
    # 0.6: 2, t-shirt, none, an apple, unanswerable -> 5
    # 0.3: a dog, yes it is, 3.5, Blue! -> 4
    # 0.0: "", its, 9:30 -> 3
    expected = (6 * 1.0 + 7 * 0.9 + 5 * 0.6 + 4 * 0.3) / 25
    got = sum(vqa_accuracy_lenient(p, a) for p, a, _, _ in VQA_CASES) / len(VQA_CASES)
    assert got == pytest.approx(expected)


def test_vqa_accuracy_with_fewer_than_ten_answers():
    # 5 answers, 1 matching: the subset without it has 0 matches, the 4 others have 1 -> (0 + 4/3)/5.
    for scorer in (vqa_accuracy_official, vqa_accuracy_evalai, vqa_accuracy_original, vqa_accuracy_lenient):
        assert scorer("red", ["red", "blue", "blue", "blue", "blue"]) == pytest.approx(4 / 15)


def test_normalisation_examples():
    assert normalize_vqa_answer("The Two Dogs.") == "2 dogs"
    assert normalize_vqa_answer("isnt it") == "isn't it"
    assert normalize_vqa_answer("") == ""


# (prediction, humans, official, evalai, original), worked out from the sources' rules:
# official normalises both sides only when humans differ and compares case-sensitively; original
# is official compared lower-cased; evalai always normalises the prediction, and gives differing
# humans punctuation processing only (no lower-casing, digits or articles).
VARIANT_CASES = [
    ("yes.", humans(("yes", 10)), 0.0, 1.0, 0.0),  # unanimous: no normalisation in official/original
    ("Yes", humans(("yes", 10)), 0.0, 1.0, 1.0),  # case: only original compares lower-cased
    ("Two", humans(("2", 10)), 0.0, 1.0, 0.0),
    ("two", humans(("2", 3), ("3", 7)), 0.9, 0.9, 0.9),  # humans differ: all normalise the prediction
    ("2", humans(("two", 3), ("3", 7)), 0.9, 0.0, 0.9),  # evalai keeps the humans' "two"
    ("dog", humans(("the dog", 3), ("cat", 7)), 0.9, 0.0, 0.9),  # ... and their articles
    ("red", humans(("Red", 4), ("blue", 6)), 1.0, 0.0, 1.0),  # ... and their case
    ("t-shirt", humans(("t shirt", 3), ("shirt", 7)), 0.9, 0.9, 0.9),
    ("yes", humans((" yes", 10)), 1.0, 0.0, 1.0),  # evalai does not strip the humans
]


@pytest.mark.parametrize("prediction,answers,official,evalai,original", VARIANT_CASES)
def test_vqa_accuracy_variants_hand_worked(prediction, answers, official, evalai, original):
    assert vqa_accuracy_official(prediction, answers) == pytest.approx(official)
    assert vqa_accuracy_evalai(prediction, answers) == pytest.approx(evalai)
    assert vqa_accuracy_original(prediction, answers) == pytest.approx(original)


def test_at_most_32_periods_are_removed():
    # The sources pass re.UNICODE (32) as re.sub's count.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("a." * 33) == "a" * 32 + "a."
    assert vqa_accuracy_official("yes" + "." * 33, humans(("yes", 5), ("no", 5))) == 0.0
    assert vqa_accuracy_official("yes" + "." * 32, humans(("yes", 5), ("no", 5))) == 1.0


@pytest.mark.parametrize("reply,expected", [
    ("Yes, it is.", True), ("no", False), ("No.", False), ("not sure", None), ("yes and no", None),
    ("", None), ("I know", None),
])
def test_parse_yes_no(reply, expected):
    assert parse_yes_no(reply) is expected


@pytest.mark.parametrize("reply,expected", [("True.", True), ("That is false", False), ("yes", True),
                                            ("true or false", None), ("maybe", None)])
def test_parse_true_false(reply, expected):
    assert parse_true_false(reply) is expected


def test_auroc_hand_worked():
    # Pairs (positive, negative): 0.9>0.8, 0.9>0.6, 0.7<0.8, 0.7>0.6 -> 3 of 4.
    assert auroc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.75)
    # Positives {1, 0.5}, negatives {1, 0}: tie (0.5) + win + loss + win = 2.5 of 4.
    assert auroc([1, 1, 0, 0.5], [1, 0, 0, 1]) == pytest.approx(0.625)
    assert auroc([1, 0], [1, 0]) == 1.0
    assert auroc([0, 1], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([0.3, 0.4], [1, 1])


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # empty boxes
    # Inclusive pixels: the 5..10 overlap is 6 px wide; each box 11 x 11.
    assert box_iou_original([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(36 / (121 + 121 - 36))


@pytest.mark.parametrize("reply,expected", [
    ("{<10><20><30><40>}", (10, 20, 30, 40)),
    ("it is at { <1> <2> <3> <4> } here", (1, 2, 3, 4)),
    ("{<0><0><100><100>}", (0, 0, 100, 100)),
    ("{<10><20><130><40>}", (10, 20, 130, 40)),  # past the 0..100 grid: kept and scaled, as the original does
    ("{<10><20><30><40>} <5>", None),  # more than four numbers: a miss, as the original
    ("{<10><20><30>}", None),
    ("", None),
])
def test_parse_grid_box(reply, expected):
    assert parse_grid_box(reply) == expected


def test_grid_to_pixels():
    assert grid_to_pixels((10, 50, 100, 100), width=200, height=80) == [20, 40, 200, 80]
