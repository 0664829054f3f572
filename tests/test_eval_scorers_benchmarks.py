"""Our GQA, VizWiz, IconQA, Hateful Memes, RefCOCO and VSR scorings against their references.

The expected values are outputs of the reference code itself (official scorers and the original
TinyGPT-V scripts), made by tests/fixtures/make_benchmark_scorer_fixtures.py (its docstring names
each source, commit and the command) and stored under tests/fixtures/scorers/<benchmark>/.
Per-sample values must be equal; aggregates of sklearn-style ranking metrics within 1e-9
(summation order). The end-to-end tests read tiny files in each benchmark's real format through
our benchmark classes and compare the aggregates with the references' aggregates on the same files.
"""
import json
from pathlib import Path

import pytest
import torch

from tinygpt_v.evaluation.benchmarks.gqa import GQA
from tinygpt_v.evaluation.benchmarks.hateful_memes import HatefulMemes
from tinygpt_v.evaluation.benchmarks.iconqa import IconQA
from tinygpt_v.evaluation.benchmarks.refcoco import RefCOCO
from tinygpt_v.evaluation.benchmarks.vizwiz import VizWiz
from tinygpt_v.evaluation.benchmarks.vsr import VSR
from tinygpt_v.evaluation.original import ORIGINAL_GENERATION, decode_like_original
from tinygpt_v.evaluation.scoring import (accuracy_at_half, box_iou, gqa_official, gqa_original, grid_to_pixels,
                                          hateful_memes_original, iconqa_chosen_index, iconqa_official,
                                          iconqa_original, iconqa_original_candidates, parse_grid_box, refcoco_official,
                                          refcoco_original, roc_auc, vizwiz_answerable, vizwiz_official,
                                          vizwiz_original, vizwiz_unanswerability, vsr_original)

FIXTURES = Path(__file__).parent / "fixtures" / "scorers"


def load(benchmark: str) -> dict:
    return json.loads((FIXTURES / benchmark / "cases.json").read_text(encoding="utf-8"))


def mismatches(cases, ours, key):
    bad = [(c, o) for c, o in zip(cases, ours) if o != c[key]]
    return f"{len(bad)} of {len(cases)} differ, e.g. {bad[:3]}"


# --- per-sample agreement ---------------------------------------------------------------------------

def test_gqa_matches_eval_py_and_the_original_script():
    cases = load("gqa")["cases"]
    assert len(cases) >= 1000
    official = [gqa_official(c["reply"], c["answer"]) for c in cases]
    original = [float(gqa_original(c["reply"], c["answer"])) for c in cases]
    assert official == [c["official"] for c in cases], mismatches(cases, official, "official")
    assert original == [c["original"] for c in cases], mismatches(cases, original, "original")
    assert 0 < sum(official) < len(cases) and 0 < sum(original) < len(cases)  # both outcomes exercised


def test_vizwiz_matches_the_vizwiz_api_and_the_original_script():
    data = load("vizwiz")
    cases = data["cases"]
    official = [round(100 * vizwiz_official(c["reply"], c["answers"]), 15) for c in cases]
    original = [vizwiz_original(c["reply"], c["answers"]) for c in cases]
    assert official == [c["official_percent"] for c in cases], mismatches(cases, official, "official_percent")
    assert original == [c["original"] for c in cases], mismatches(cases, original, "original")
    assert data["unanswerability_groups"]
    for group in data["unanswerability_groups"]:
        picked = [cases[i] for i in group["cases"]]
        ours = vizwiz_unanswerability([c["answerable"] for c in picked],
                                      [vizwiz_answerable(c["reply"]) for c in picked])
        assert ours["average_precision"] == pytest.approx(group["average_precision"], abs=1e-9)
        assert ours["f1"] == pytest.approx(group["f1_score"], abs=1e-9)


def test_iconqa_matches_compute_test_acc_and_the_original_script():
    data = load("iconqa")
    cases = data["cases"]
    for c in cases:
        # as the runner: the top-scored candidate (first of equal scores) is the stored prediction
        prediction = c["choices"][c["logits"].index(max(c["logits"]))]
        assert iconqa_chosen_index(prediction, c["choices"]) == c["official_chosen"], c
        assert iconqa_official(iconqa_chosen_index(prediction, c["choices"]), c["answer"]) == c["official"], c
        assert iconqa_original_candidates(c["choices"]) == c["original_candidates"], c
        chosen = c["original_candidates"][c["original_chosen"]]
        assert iconqa_original(chosen, c["choices"], c["answer"]) == c["original"], c
    assert sum(c["official"] for c in cases) / len(cases) * 100 == pytest.approx(data["official_accuracy"])
    assert any("_" in "".join(c["choices"]) and c["official"] != c["original"] for c in cases)


def test_iconqa_root_script_is_broken_as_documented():
    assert load("iconqa")["root_eval_vqa_error"].startswith("TypeError")


def test_hateful_memes_matches_sklearn_and_the_original_script():
    data = load("hateful_memes")
    cases = data["cases"]
    original = [hateful_memes_original(c["reply"], c["label"]) for c in cases]
    assert original == [float(c["original"]) for c in cases], mismatches(cases, original, "original")
    for group in data["groups"]:
        assert roc_auc(group["labels"], group["scores"]) == pytest.approx(group["auroc"], abs=1e-12)
        assert accuracy_at_half(group["labels"], group["scores"]) == group["accuracy"]


def test_vsr_matches_the_original_script():
    cases = load("vsr")["cases"]
    original = [vsr_original(c["reply"], c["label"]) for c in cases]
    assert original == [float(c["original"]) for c in cases], mismatches(cases, original, "original")
    # eval_scripts/eval_vqa.py's second rule, documented and not followed: a sample can score 2
    assert max(c["original_eval_scripts"] for c in cases) == 2


def test_refcoco_matches_eval_ref_py_and_torchvision_iou():
    cases = load("refcoco")["cases"]
    original = [refcoco_original(c["reply"], c["bbox"], c["width"], c["height"]) for c in cases]
    assert original == [float(c["original"]) for c in cases], mismatches(cases, original, "original")
    assert 0 < sum(original) < len(cases)
    compared = 0
    for c in cases:
        box = parse_grid_box(c["reply"])
        if box is None or box[2] <= box[0] or box[3] <= box[1]:
            assert refcoco_official(c["reply"], c["bbox"], c["width"], c["height"]) == 0.0  # a miss, never a crash
            continue
        x, y, w, h = c["bbox"]
        ours = box_iou(grid_to_pixels(box, c["width"], c["height"]), [x, y, x + w, y + h])
        assert ours == pytest.approx(c["iou_torchvision"], abs=1e-9), c
        compared += 1
    assert compared > len(cases) // 3


@pytest.mark.parametrize("reply", ["{<12><10><10><10>}", "{<5><5><5><5>}", "{<0><0><0><0>}", "{<999><1><2><3>}",
                                   "{<1><2><3><4>} <5>", "{<1><2><3>}", "", "{<-3><4><5><6>}"])
def test_refcoco_never_raises(reply):
    for scorer in (refcoco_official, refcoco_original):
        assert scorer(reply, [10, 10, 0, 0], 100, 100) in (0.0, 1.0)


# --- prompts and generation of the original protocol ------------------------------------------------

def write(path, text):
    path.write_text(text)
    return str(path)


def test_original_protocol_builds_the_original_prompts(tmp_path):
    prompts = json.loads((FIXTURES / "prompts.json").read_text(encoding="utf-8"))
    gqa = write(tmp_path / "q.json", json.dumps({"1": {"imageId": "n", "question": "What is thing 0?", "answer": "x"}}))
    vizwiz = write(tmp_path / "v.json",
                   json.dumps([{"image": "a.jpg", "question": "q0?", "answers": [{"answer": "x"}]}]))
    hm = write(tmp_path / "h.jsonl", json.dumps({"id": 1, "img": "img/x.png", "label": 0, "text": "t0"}) + "\n")
    vsr = write(tmp_path / "s.jsonl", json.dumps({"image": "x.jpg", "caption": "c0", "label": 1}) + "\n")
    iconqa = write(tmp_path / "p.json", json.dumps({"7": {"question": "q0?", "choices": ["a", "b"], "answer": 0,
                                                          "ques_type": "choose_txt", "split": "test"}}))
    refcoco = write(tmp_path / "r.json", json.dumps([{"img_id": "COCO_train2014_000000000001_0", "sents": "the thing",
                                                      "bbox": [0, 0, 1, 1], "width": 2, "height": 2}]))
    built = {
        "gqa": GQA(questions=gqa, image_root="i", protocol="original"),
        "vizwiz": VizWiz(annotations=vizwiz, image_root="i", protocol="original"),
        "hateful_memes": HatefulMemes(annotations=hm, image_root="i", protocol="original"),
        "vsr": VSR(annotations=vsr, image_root="i", protocol="original"),
        "iconqa": IconQA(problems=iconqa, image_root="i", protocol="original"),
        "refcoco": RefCOCO(annotations=refcoco, image_root="i", protocol="original"),
    }
    for name, benchmark in built.items():
        assert benchmark.samples()[0].prompt == prompts[name]["prompt_example"], name
        kwargs = prompts[name]["generate_kwargs"]
        if kwargs:  # what the scripts pass to generate, and we pass the same
            assert all(ORIGINAL_GENERATION[k] == v for k, v in kwargs.items() if k != "max_new_tokens"), name
            assert kwargs["max_new_tokens"] == 20
    # ours: the bare instruction; the model applies its template
    assert GQA(questions=gqa, image_root="i").samples()[0].prompt.startswith("<Img><ImageHere></Img> [vqa]")


def test_original_protocol_ranks_the_underscore_split_candidates(tmp_path):
    iconqa = write(tmp_path / "p.json", json.dumps({"7": {"question": "q?", "choices": ["big_red", "blue"], "answer": 1,
                                                          "ques_type": "choose_txt", "split": "test"}}))
    original = IconQA(problems=iconqa, image_root="i", protocol="original")
    assert original.samples()[0].candidates == ("big", "red", "blue")
    assert IconQA(problems=iconqa, image_root="i").samples()[0].candidates == ("big_red", "blue")


def test_original_generate_settings_and_decoding_match_minigpt_base():
    generate = json.loads((FIXTURES / "prompts.json").read_text(encoding="utf-8"))["generate"]
    hf = generate["hf_generate_kwargs"]
    assert generate["stopping_criteria_passed"] is False  # commented out in the original: no stop at "###"
    assert ORIGINAL_GENERATION["stop_at_end_sym"] is False
    assert hf["num_beams"] == ORIGINAL_GENERATION["num_beams"] and hf["do_sample"] == ORIGINAL_GENERATION["do_sample"]
    assert hf["top_p"] == ORIGINAL_GENERATION["top_p"] and hf["temperature"] == ORIGINAL_GENERATION["temperature"]
    assert hf["repetition_penalty"] == ORIGINAL_GENERATION["repetition_penalty"] and hf["length_penalty"] == 1
    assert hf["min_length"] == 1 and ORIGINAL_GENERATION["min_new_tokens"] == 1  # see evaluation/original.py
    for case in generate["decoded"]:
        assert decode_like_original(case["decoded"]) == case["answer"], case


def test_runner_generates_with_the_original_settings():
    from tinygpt_v.evaluation.runner import Generation
    ours = Generation(batch_size=1, max_new_tokens=20, num_beams=1, image_size=16)
    original = Generation(batch_size=1, max_new_tokens=20, num_beams=1, image_size=16, original=True)
    assert ours.generate_kwargs() == {"max_new_tokens": 20, "do_sample": False, "num_beams": 1}
    kwargs = original.generate_kwargs()
    assert kwargs["apply_template"] is False and kwargs["stop_at_end_sym"] is False
    assert kwargs["min_new_tokens"] == 1 and kwargs["top_p"] == 0.9 and kwargs["do_sample"] is False
    assert original.meta("m")["protocol"] == "original" and "protocol" not in ours.meta("m")


# --- end to end on official-format files ------------------------------------------------------------

def rows_for(samples, reply_of):
    return [{"id": s.id, "prompt": s.prompt, "prediction": reply_of(s), "target": s.target} for s in samples]


def lookup(replies: dict):
    def reply_of(sample):
        found = [reply for key, reply in replies.items() if key in sample.prompt]
        assert len(found) == 1, (sample.prompt, found)
        return found[0]
    return reply_of


def write_files(tmp_path, files: dict) -> dict:
    paths = {}
    for name, content in files.items():
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in content))
        else:
            path.write_text(json.dumps(content))
        paths[name] = str(path)
    return paths


def assert_aggregates(ours: dict, reference: dict):
    for metric, value in reference.items():
        assert ours[metric] == pytest.approx(value, abs=1e-9), (metric, ours, reference)


E2E_BUILDERS = {
    "gqa": lambda p, protocol: GQA(questions=p["testdev_balanced_questions.json"], image_root="i", protocol=protocol),
    "vizwiz": lambda p, protocol: VizWiz(annotations=p["val.json"], image_root="i", protocol=protocol),
    "hateful_memes": lambda p, protocol: HatefulMemes(annotations=p["dev_seen.jsonl"], image_root="i",
                                                      protocol=protocol),
    "vsr": lambda p, protocol: VSR(annotations=p["test.jsonl"], image_root="i", protocol=protocol),
    "refcoco": lambda p, protocol: RefCOCO(annotations=p["refcoco_val.json"], image_root="i", protocol=protocol),
}


@pytest.mark.parametrize("name", sorted(E2E_BUILDERS))
@pytest.mark.parametrize("protocol", ["ours", "original"])
def test_end_to_end_aggregates_equal_the_references(tmp_path, name, protocol):
    e2e = load(name)["e2e"]
    benchmark = E2E_BUILDERS[name](write_files(tmp_path, e2e["files"]), protocol)
    rows = rows_for(benchmark.samples(), lookup(e2e["replies"]))
    assert_aggregates(benchmark.score(rows, "original"), e2e["original"])
    if "official" in e2e:
        assert_aggregates(benchmark.score(rows, "official"), e2e["official"])
    if "official_subset" in e2e:  # RefCOCO: the replies that are one well-formed box
        subset = [rows[i] for i in e2e["official_subset"]]
        assert benchmark.score(subset, "official")["accuracy"] == pytest.approx(e2e["official_subset_accuracy"])


@pytest.mark.parametrize("protocol", ["ours", "original"])
def test_end_to_end_iconqa(tmp_path, protocol):
    e2e = load("iconqa")["e2e"]
    benchmark = IconQA(problems=write_files(tmp_path, e2e["files"])["problems.json"], image_root="i", protocol=protocol)
    samples = benchmark.samples()
    if protocol == "ours":  # the top pick among the choices (compute_test_acc's argmax)
        rows = rows_for(samples, lookup(e2e["chosen"]))
        assert_aggregates(benchmark.score(rows, "official"), e2e["official"])
    else:  # the original ranks the `_`-split candidates; its top pick is the stored prediction
        rows = rows_for(samples, lookup(e2e["chosen_original"]))
        assert all(row["prediction"] in s.candidates for row, s in zip(rows, samples))
        assert_aggregates(benchmark.score(rows, "original"), e2e["original"])


# --- the model's generate in the original protocol --------------------------------------------------

def test_generate_original_settings_do_not_stop_or_cut_at_end_sym(tiny_model, monkeypatch):
    tiny_model.end_sym = "###"
    seen = {}
    text = "yes###Assistant: no"
    ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.tensor([ids])
    monkeypatch.setattr(tiny_model.llm, "generate", fake_generate)
    prompt = "###Human: <Img><ImageHere></Img> q###Assistant: "
    images = torch.zeros(1, 3, tiny_model_image_size(tiny_model), tiny_model_image_size(tiny_model))
    original = tiny_model.generate(images, [prompt], max_new_tokens=20, apply_template=False, stop_at_end_sym=False,
                                   min_new_tokens=1)
    assert seen["stop_strings"] is None and seen["min_new_tokens"] == 1
    assert original == [tiny_model.tokenizer.decode(ids, skip_special_tokens=True).strip()]
    assert "###" in original[0]  # the scripts see the text after "###" (GQA/VSR search it)
    ours = tiny_model.generate(images, [prompt], max_new_tokens=20, apply_template=False)
    assert seen["stop_strings"] == ["###"] and seen["min_new_tokens"] is None
    assert "###" not in ours[0]


def tiny_model_image_size(model) -> int:
    from tinygpt_v.evaluation.loading import model_image_size
    return model_image_size(model)
