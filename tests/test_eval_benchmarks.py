"""Each benchmark reads a toy file in its official format and scores hand-made predictions.

Every expected number is worked out by hand in the comment next to it. Predictions are raw model
replies; `rows()` pairs them with the samples the benchmark built, as the runner does.
"""
import json
import pickle
from collections import OrderedDict

import pytest

from tinygpt_v.evaluation.benchmark import BenchmarkDataError
from tinygpt_v.evaluation.benchmarks.gqa import GQA
from tinygpt_v.evaluation.benchmarks.hateful_memes import HatefulMemes
from tinygpt_v.evaluation.benchmarks.iconqa import IconQA
from tinygpt_v.evaluation.benchmarks.refcoco import RefCOCO
from tinygpt_v.evaluation.benchmarks.vizwiz import VizWiz
from tinygpt_v.evaluation.benchmarks.vqa import VQA
from tinygpt_v.evaluation.benchmarks.vsr import VSR

VQA_PROMPT = "<Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: "


def rows(samples, predictions):
    assert len(samples) == len(predictions)
    return [{"id": s.id, "prompt": s.prompt, "prediction": p, "target": s.target} for s, p in zip(samples, predictions)]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- GQA ---------------------------------------------------------------------------------------

def test_gqa(tmp_path):
    def q(image, question, answer, kind):
        return {"imageId": image, "question": question, "answer": answer, "fullAnswer": "...",
                "types": {"structural": kind, "semantic": "attr", "detailed": "x"}, "isBalanced": True}
    questions = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": q("n1", "Is the sky blue?", "yes", "verify"),
        "202": q("n2", "What color is the car?", "red", "query"),
        "203": q("n3", "What is on the table?", "cup", "query"),
        "204": q("n4", "Is it raining?", "no", "verify"),
        "205": q("n5", "What color is the bus?", "red", "query"),
    })
    samples = GQA(questions=questions, image_root=str(tmp_path / "images")).samples()
    assert [s.id for s in samples] == ["201", "202", "203", "204", "205"]
    assert samples[0].prompt == VQA_PROMPT + "Is the sky blue?"
    assert samples[0].image == str(tmp_path / "images" / "n1.jpg")

    r = rows(samples, ["Yes.", "The car is red", "", "not sure", "red"])
    # official (eval.py: the prediction as given == answer): only "red" (205) -> 1/5
    official = GQA(questions=questions, image_root="x").score(r, "official")
    assert official["accuracy"] == pytest.approx(20.0)
    assert official["accuracy/binary"] == pytest.approx(0.0)  # 201 "Yes." != "yes", 204 wrong
    assert official["accuracy/open"] == pytest.approx(100 / 3)  # 205 ok of 202, 203, 205
    # original (label inside the lower-cased reply): yes, red in "the car is red", -, "no" in "not sure", red -> 4/5
    assert GQA(questions=questions, image_root="x").score(r, "original")["accuracy"] == pytest.approx(80.0)
    # the original searches the whole reply, after "###" too
    late = rows(samples[:1], ["maybe###yes"])
    assert GQA(questions=questions, image_root="x").score(late, "original")["accuracy"] == pytest.approx(100.0)


def test_gqa_scores_balanced_questions_only(tmp_path):
    questions = write_json(tmp_path / "q.json", {
        "1": {"imageId": "n1", "question": "a?", "answer": "yes", "isBalanced": True},
        "2": {"imageId": "n2", "question": "b?", "answer": "no", "isBalanced": False}})
    assert [s.id for s in GQA(questions=questions, image_root="x").samples()] == ["1"]


def test_gqa_names_the_question_with_a_missing_key(tmp_path):
    questions = write_json(tmp_path / "q.json", {"7": {"imageId": "n1", "answer": "yes"}})
    with pytest.raises(BenchmarkDataError, match=r"q.json: question 7: missing key 'question'"):
        GQA(questions=questions, image_root="x").samples()


# --- VSR ---------------------------------------------------------------------------------------

def test_vsr(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    (tmp_path / "coco" / "train2017" / "000000000001.jpg").write_bytes(b"")
    (tmp_path / "coco" / "val2017" / "000000000002.jpg").write_bytes(b"")
    captions = [("000000000001.jpg", "The cat is left of the dog.", 1),
                ("000000000002.jpg", "The cup is on the bed.", 0),
                ("000000000003.jpg", "The man is under the bridge.", 1),
                ("000000000004.jpg", "The car is in the box.", 0),
                ("000000000005.jpg", "The bird is above the tree.", 1)]
    annotations = write_jsonl(tmp_path / "test.jsonl", [
        {"image": image, "image_link": "http://...", "caption": caption, "label": label, "relation": "left of"}
        for image, caption, label in captions])
    vsr = VSR(annotations=annotations, image_root=str(tmp_path / "coco"))
    samples = vsr.samples()
    assert samples[0].prompt == ("<Img><ImageHere></Img> [vqa] Based on the image, is this statement true or false? "
                                 "The cat is left of the dog.")
    assert samples[0].image == str(tmp_path / "coco" / "train2017" / "000000000001.jpg")
    assert samples[1].image == str(tmp_path / "coco" / "val2017" / "000000000002.jpg")

    r = rows(samples, ["True", "false", "yes, true", "I don't know", ""])
    official = vsr.score(r, "official")
    assert official["accuracy"] == pytest.approx(60.0)  # true ok, false ok, yes+true ok, unclear, empty
    assert official["answers/unparsed"] == pytest.approx(40.0)
    # original (root eval_vqa.py: the label word in the reply): true, false, true, -, - -> 3/5
    assert vsr.score(r, "original")["accuracy"] == pytest.approx(60.0)


def test_vsr_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "c", "label": 1}\n{"image": "b.jpg", \n')
    with pytest.raises(BenchmarkDataError, match=r"test.jsonl:2: not valid JSON"):
        VSR(annotations=str(path), image_root=str(tmp_path)).samples()


# --- IconQA ------------------------------------------------------------------------------------

def iconqa_problems(tmp_path):
    def p(question, choices, answer, ques_type="choose_txt", split="test"):
        return {"question": question, "choices": choices, "answer": answer, "ques_type": ques_type,
                "grade": "prek", "label": "x", "split": split}
    return write_json(tmp_path / "problems.json", {
        "1": p("How many dots are there?", ["2", "3", "4"], 1),
        "2": p("Which shape is this?", ["circle", "square"], 0),
        "3": p("Which picture shows a cat?", [], 0, ques_type="choose_img"),
        "4": p("How many stars?", ["5", "6"], 0, split="train"),
        "5": p("How many sides?", ["one", "two"], 1),
    })


def test_iconqa_ranks_choices_by_likelihood(tmp_path):
    iconqa = IconQA(problems=iconqa_problems(tmp_path), image_root=str(tmp_path / "iconqa"))
    samples = iconqa.samples()
    assert [s.id for s in samples] == ["1", "2", "5"]  # test split, choose_txt only
    assert samples[0].candidates == ("2", "3", "4")
    assert samples[0].target["answer"] == 1  # the gold index, as IconQA scores
    assert samples[0].image == str(tmp_path / "iconqa" / "test" / "choose_txt" / "1" / "image.png")
    r = rows(samples, ["3", "square", "two"])  # the top-ranked choice of each
    assert iconqa.score(r, "official")["accuracy"] == pytest.approx(200 / 3)
    assert iconqa.score(r, "original")["accuracy"] == pytest.approx(200 / 3)


def test_iconqa_generate_mode_takes_the_option_equal_to_the_reply(tmp_path):
    iconqa = IconQA(problems=iconqa_problems(tmp_path), image_root=str(tmp_path), method="generate")
    samples = iconqa.samples()
    assert all(s.candidates is None for s in samples)
    r = rows(samples, [" 3 ", "Circle", "two"])  # option 1 (stripped), no option, option 1
    assert iconqa.score(r, "official")["accuracy"] == pytest.approx(200 / 3)


def test_iconqa_scores_the_index_so_a_repeated_option_counts_once(tmp_path):
    problems = write_json(tmp_path / "problems.json", {"9": {"question": "q", "choices": ["a", "b", "a"], "answer": 2,
                                                             "ques_type": "choose_txt", "split": "test"}})
    iconqa = IconQA(problems=problems, image_root=str(tmp_path))
    # equal options score equally and the first wins the argmax: index 0, not the gold index 2
    assert iconqa.score(rows(iconqa.samples(), ["a"]), "official")["accuracy"] == 0.0


def test_iconqa_rejects_an_answer_outside_the_choices(tmp_path):
    problems = write_json(tmp_path / "problems.json", {"9": {"question": "q", "choices": ["a"], "answer": 3,
                                                             "ques_type": "choose_txt", "split": "test"}})
    with pytest.raises(BenchmarkDataError, match="problem 9: answer index 3"):
        IconQA(problems=problems, image_root=str(tmp_path)).samples()


# --- VizWiz ------------------------------------------------------------------------------------

def test_vizwiz(tmp_path):
    def entry(i, answers, answer_type):
        return {"image": f"VizWiz_val_{i:08d}.jpg", "question": f"question {i}?",
                "answerable": int(answer_type != "unanswerable"), "answer_type": answer_type,
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
    annotations = write_json(tmp_path / "val.json", [
        entry(0, ["unanswerable"] * 10, "unanswerable"),
        entry(1, ["coca cola"] * 2 + ["coke"] * 5 + ["soda"] * 3, "other"),
        entry(2, ["red"] + ["dark red"] * 2 + ["maroon"] * 7, "other"),
        entry(3, ["yes"] * 10, "yes/no"),
        entry(4, ["2"] * 4 + ["two"] * 3 + ["3"] * 3, "number"),
    ])
    vizwiz = VizWiz(annotations=annotations, image_root=str(tmp_path / "val"))
    samples = vizwiz.samples()
    assert samples[0].id == "VizWiz_val_00000000.jpg"
    assert samples[0].prompt == ("<Img><ImageHere></Img> [vqa] The question is 'question 0?' Based on the image, "
                                 "answer the question with a single word or phrase. and reply 'unanswerable' when "
                                 "the provided information is insufficient")
    r = rows(samples, ["Unanswerable.", "Coke", "red", "", "two"])
    official = vizwiz.score(r, "official")
    # the prediction is normalised, the humans are not: "unanswerable" 10 -> 1; "coke" vs "coke" x5 -> 1;
    # "red" x1 -> 0.3; empty 0; "two" -> "2", 4 humans said "2" -> 1: 3.3 of 5
    assert official["accuracy"] == pytest.approx(66.0)
    assert official["accuracy/unanswerable"] == pytest.approx(100.0)
    assert official["accuracy/other"] == pytest.approx(65.0)
    assert official["accuracy/yes/no"] == pytest.approx(0.0)
    assert official["accuracy/number"] == pytest.approx(100.0)
    # answerability: the one unanswerable question is the one predicted unanswerable -> AP 100, F1 100
    assert official["unanswerable/average_precision"] == pytest.approx(100.0)
    assert official["unanswerable/f1"] == pytest.approx(100.0)
    # stored human answers are compared as they are: ten "Coca-Cola" never match a reply
    cased = rows(samples[1:2], ["Coca-Cola"])
    cased[0]["target"] = {**cased[0]["target"], "answers": ["Coca-Cola"] * 10}
    assert vizwiz.score(cased, "official")["accuracy"] == 0.0
    # original: containment either way, min(count/3, 1): 10, 5, red in "dark red" -> 3, empty is in all 10, 3 -> all 1
    assert vizwiz.score(r, "original")["accuracy"] == pytest.approx(100.0)


# --- Hateful Memes -----------------------------------------------------------------------------

def test_hateful_memes(tmp_path):
    labels = [1, 0, 1, 0, 0]
    annotations = write_jsonl(tmp_path / "dev_seen.jsonl", [
        {"id": i, "img": f"img/{i:05d}.png", "label": label, "text": f"meme text {i}"}
        for i, label in enumerate(labels, 1)])
    memes = HatefulMemes(annotations=annotations, image_root=str(tmp_path))
    samples = memes.samples()
    assert samples[0].image == str(tmp_path / "img" / "00001.png")
    assert samples[0].prompt == ("<Img><ImageHere></Img> This is an image writting 'meme text 1'. "
                                 "Is this image hateful? Answer yes or no. Answer:")
    r = rows(samples, ["Yes.", "no", "No, it is not hateful", "I cannot tell", "yes"])
    official = memes.score(r, "official")
    assert official["accuracy"] == pytest.approx(60.0)  # at 0.5: 1, 0, 0, 0 (unclear), 1 -> right: 1, 2, 4
    # scores 1, 0, 0, 0.5, 1 with labels 1, 0, 1, 0, 0. Positive-negative pairs:
    # (1 vs 0) 1, (1 vs 0.5) 1, (1 vs 1) 0.5, (0 vs 0) 0.5, (0 vs 0.5) 0, (0 vs 1) 0 -> 3 of 6
    assert official["auroc"] == pytest.approx(50.0)
    assert official["answers/unparsed"] == pytest.approx(20.0)
    # original: yes->1 ok, no->0 ok, no->0 wrong, "cannot" holds "no" -> 0 ok, yes->1 wrong
    assert memes.score(r, "original")["accuracy"] == pytest.approx(60.0)


# --- VQAv2 / OK-VQA ----------------------------------------------------------------------------

def vqa_files(tmp_path, extra_question=None):
    questions = [{"image_id": 1, "question": "What is the man holding?", "question_id": 101},
                 {"image_id": 2, "question": "How many dogs?", "question_id": 102},
                 {"image_id": 1, "question": "Is it raining?", "question_id": 103}]
    questions += [extra_question] if extra_question else []

    def annotation(qid, image_id, answers, answer_type):
        return {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": answer_type,
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}
    annotations = [annotation(101, 1, ["umbrella"] * 3 + ["an umbrella"] * 2 + ["parasol"] * 5, "other"),
                   annotation(102, 2, ["2"] * 10, "number"),
                   annotation(103, 1, ["yes"] * 2 + ["no"] * 8, "yes/no")]
    return (write_json(tmp_path / "questions.json", {"info": {}, "task_type": "Open-Ended", "questions": questions}),
            write_json(tmp_path / "annotations.json", {"info": {}, "annotations": annotations}))


def test_vqa(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    vqa = VQA(questions=questions, annotations=annotations, image_root=str(tmp_path / "val2014"))
    samples = vqa.samples()
    assert [s.id for s in samples] == ["101", "102", "103"]
    assert samples[1].image == str(tmp_path / "val2014" / "COCO_val2014_000000000002.jpg")
    assert samples[1].prompt == VQA_PROMPT + "How many dogs?"
    r = rows(samples, ["Umbrella", "two", "yes."])
    official = vqa.score(r, "official")
    # official: humans differ on 101 -> both sides normalised ("Umbrella", "an umbrella" -> "umbrella"),
    # 5 match -> 1; humans all say "2": nothing normalised, "two" -> 0; yes: 2 match -> 0.6
    assert official["accuracy"] == pytest.approx(160 / 3)
    assert official["accuracy/yes/no"] == pytest.approx(60.0)
    assert official["accuracy/number"] == pytest.approx(0.0)
    assert vqa.score(r, "original")["accuracy"] == pytest.approx(160 / 3)  # the same (lower-cased reply)
    # evalai: the prediction is always normalised, the humans only lose punctuation: "an umbrella"
    # stays, 3 match -> 0.9; "two" -> "2", 10 match -> 1; yes -> 0.6
    assert vqa.score(r, "evalai")["accuracy"] == pytest.approx(250 / 3)
    assert vqa.score(r, "lenient")["accuracy"] == pytest.approx(260 / 3)


def test_vqa_image_pattern(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    vqa = VQA(questions=questions, annotations=annotations, image_root="imgs", image_pattern="{image_id:012d}.jpg")
    assert vqa.samples()[0].image.endswith("imgs/000000000001.jpg")


def test_vqa_question_without_annotation_is_named(tmp_path):
    questions, annotations = vqa_files(tmp_path, {"image_id": 3, "question": "Why?", "question_id": 999})
    with pytest.raises(BenchmarkDataError, match=r"questions\[3\]: question_id 999 has no entry in .*annotations.json"):
        VQA(questions=questions, annotations=annotations, image_root="x").samples()


# --- RefCOCO -----------------------------------------------------------------------------------

# The image is 200 x 100 px, so a grid unit is 2 px wide and 1 px high.
# Target 0..4: box [0, 0, 100, 50] (x, y, w, h), i.e. corners (0, 0)-(100, 50), grid (0, 0)-(50, 50).
REFCOCO_CASES = [
    # reply, official hit, original hit
    ("{<0><0><50><50>}", True, True),  # exact box
    ("{<0><0><25><50>}", True, True),  # half the box: IoU exactly 0.5 counts (>=); inclusive IoU 2601/5151 > 0.5
    ("The dog is at {<0><0><50><50>}", True, False),  # the original needs the box first
    ("{ <0> <0> <50> <50> }", True, True),  # spaces (the original removes them)
    ("", False, False),  # empty answer
    # Off the grid: scaled as the original does to (0,0)-(100,150): overlap 100*50 over 100*150 -> 0.33;
    # inclusive 101*51 = 5151 over 101*151 = 15251 -> 0.34: a miss both ways.
    ("{<0><0><50><150>}", False, False),
    ("{<0><0><50><50>} <7>", False, False),  # five numbers: the original's unpacking fails -> miss
    ("{<50><50><0><0>}", False, False),  # inverted: a miss (the original: inclusive overlap 0)
]


def refcoco_file(tmp_path):
    records = [{"img_id": f"COCO_train2014_000000000001_{i}", "sents": "the left dog", "bbox": [0, 0, 100, 50],
                "height": 100, "width": 200} for i in range(len(REFCOCO_CASES))]
    return write_json(tmp_path / "refcoco_val.json", records)


def test_refcoco_minigptv2_format(tmp_path):
    refcoco = RefCOCO(annotations=refcoco_file(tmp_path), image_root=str(tmp_path / "train2014"))
    samples = refcoco.samples()
    assert samples[0].image == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    assert samples[0].prompt == "<Img><ImageHere></Img> [refer] give me the location of the left dog"
    for sample, (reply, official_hit, original_hit) in zip(samples, REFCOCO_CASES):
        [row] = rows([sample], [reply])
        assert refcoco.score([row], "official")["accuracy"] == (100.0 if official_hit else 0.0), reply
        assert refcoco.score([row], "original")["accuracy"] == (100.0 if original_hit else 0.0), reply


def test_refcoco_box_past_the_grid_is_scaled_as_the_original_does():
    # Target (0,50)-(200,100) on a 200 x 100 image; the reply's y2 = 101 is past the 0..100 grid.
    row = {"id": "0", "prompt": "", "prediction": "{<0><50><100><101>}",
           "target": {"bbox": [0, 50, 200, 50], "width": 200, "height": 100}}
    refcoco = RefCOCO(annotations="unused.json", image_root="x")
    # scaled to (0,50)-(200,101): overlap 200*50 over 200*51 -> 0.98, a hit
    assert refcoco.score([row], "official") == {"accuracy": 100.0, "answers/unparsed": 0.0}
    # inclusive: overlap 201*51 = 10251, union 201*52 = 10452 -> 0.98
    assert refcoco.score([row], "original")["accuracy"] == 100.0


def test_refcoco_totals(tmp_path):
    refcoco = RefCOCO(annotations=refcoco_file(tmp_path), image_root=str(tmp_path))
    replies = [case[0] for case in REFCOCO_CASES]
    official = refcoco.score(rows(refcoco.samples(), replies), "official")
    assert official["accuracy"] == pytest.approx(400 / 8)  # hits: exact, half, later box, spaced
    assert official["answers/unparsed"] == pytest.approx(200 / 8)  # empty, five numbers
    original = refcoco.score(rows(refcoco.samples(), replies), "original")
    assert original["accuracy"] == pytest.approx(300 / 8)  # exact, half, spaced


def test_refcoco_refer_toolkit_format(tmp_path):
    refs = [{"ref_id": 7, "ann_id": 70, "image_id": 1, "split": "val", "category_id": 18, "file_name": "x.jpg",
             "sentences": [{"sent_id": 1, "sent": "left dog", "raw": "Left dog", "tokens": ["left", "dog"]},
                           {"sent_id": 2, "sent": "dog on the left", "raw": "", "tokens": []}]},
            {"ref_id": 8, "ann_id": 71, "image_id": 1, "split": "testA", "sentences": [{"sent_id": 3, "sent": "cat"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = write_json(tmp_path / "instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100}],
        "annotations": [{"id": 70, "image_id": 1, "bbox": [0, 0, 100, 50]},
                        {"id": 71, "image_id": 1, "bbox": [1, 1, 2, 2]}]})
    refcoco = RefCOCO(refs=str(tmp_path / "refs(unc).p"), instances=instances, split="val", image_root=str(tmp_path))
    samples = refcoco.samples()
    assert [s.id for s in samples] == ["7/1", "7/2"]
    assert samples[1].prompt.endswith("give me the location of dog on the left")
    assert samples[0].target == {"bbox": [0.0, 0.0, 100.0, 50.0], "width": 200, "height": 100}
    assert refcoco.score(rows(samples, ["{<0><0><50><50>}", "{<50><50><100><100>}"]), "official")["accuracy"] == 50.0


def test_refcoco_refuses_a_pickle_that_names_a_class(tmp_path):
    (tmp_path / "refs.p").write_bytes(pickle.dumps(OrderedDict(a=1)))
    instances = write_json(tmp_path / "instances.json", {"images": [], "annotations": []})
    refcoco = RefCOCO(refs=str(tmp_path / "refs.p"), instances=instances, split="val", image_root=str(tmp_path))
    with pytest.raises(BenchmarkDataError, match="collections.OrderedDict"):
        refcoco.samples()


def test_refcoco_needs_one_file_format():
    with pytest.raises(ValueError, match="either `annotations`"):
        RefCOCO(image_root="x", annotations="a.json", refs="refs.p")
    with pytest.raises(ValueError, match="either `annotations`"):
        RefCOCO(image_root="x", refs="refs.p")
