"""Every VQA-accuracy variant against the outputs of its source, run on 10,000 generated cases.

The fixture `tests/fixtures/scorers/vqa/cases.json.gz` was produced by running each reference's
own VQA/VQAEval classes (see tests/fixtures/make_vqa_scorer_fixtures.py for sources, commits and
the command). Nothing here needs the references.
"""
import gzip
import json
from pathlib import Path

import pytest

from tinygpt_v.evaluation.benchmarks.vqa import VQA, original_reply_cleanup
from tinygpt_v.evaluation.metrics import VQA_ACCURACY, vqa_accuracy

FIXTURE = Path(__file__).parent / "fixtures" / "scorers" / "vqa" / "cases.json.gz"


@pytest.fixture(scope="module")
def golden():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


def mismatches(scorer, predictions, golden, reference):
    found = []
    for i, (prediction, case, expected) in enumerate(zip(predictions, golden["cases"], golden["scores"][reference])):
        got = scorer(prediction, case["answers"])
        if abs(got - expected) > 1e-9:
            found.append((i, prediction, case["answers"], got, expected))
    return found


@pytest.mark.parametrize("variant,reference", [("official", "official"), ("evalai", "evalai"),
                                               ("evalai", "lavis"), ("original", "original")])
def test_variant_matches_its_source_on_every_case(golden, variant, reference):
    replies = [case["reply"] for case in golden["cases"]]
    assert len(replies) >= 10000
    found = mismatches(VQA_ACCURACY[variant], replies, golden, reference)
    assert not found, f"{len(found)} of {len(replies)} differ from {reference}; first: {found[:3]}"


def test_original_pipeline_reply_cleanup_then_scorer(golden):
    replies = [case["reply"] for case in golden["cases"]]
    cleaned = [original_reply_cleanup(r) for r in replies]
    assert cleaned == golden["cleaned"]
    found = mismatches(VQA_ACCURACY["original"], cleaned, golden, "original_pipeline")
    assert not found, f"{len(found)} differ; first: {found[:3]}"


@pytest.mark.parametrize("variant,reference", [("official", "official"), ("evalai", "evalai"),
                                               ("original", "original")])
def test_aggregate_equals_the_reference_overall(golden, variant, reference):
    scores = [VQA_ACCURACY[variant](case["reply"], case["answers"]) for case in golden["cases"]]
    assert round(100 * sum(scores) / len(scores), 2) == golden["overall"][reference]["overall"]


def test_the_fixture_exercises_the_disagreements(golden):
    # The variants must be told apart by the cases, or the tests above prove little.
    official, evalai, original = (golden["scores"][k] for k in ("official", "evalai", "original"))
    assert sum(a != b for a, b in zip(official, evalai)) > 500
    assert sum(a != b for a, b in zip(official, original)) > 100
    assert sum(0 < s < 1 for s in official) > 500
    assert any(case["reply"].count(".") > 32 for case in golden["cases"])


def test_lenient_is_not_the_default():
    assert vqa_accuracy is VQA_ACCURACY["official"]
    assert list(VQA_ACCURACY)[0] == "official"
    assert VQA_ACCURACY["lenient"]("Yes.", ["yes"] * 10) == 1.0
    assert VQA_ACCURACY["official"]("Yes.", ["yes"] * 10) == 0.0


def test_okvqa_original_protocol_prompt_is_the_originals():
    # The prompt the original's eval_vqa.py built for GQA (recorded by running it, see
    # tests/fixtures/make_benchmark_scorer_fixtures.py); its OKVQAEvalData writes the same
    # instruction, so OK-VQA's differs only in the question.
    recorded = json.loads((FIXTURE.parents[1] / "prompts.json").read_text())["gqa"]["prompt_example"]
    e2e = FIXTURE.parent / "e2e"
    okvqa = VQA(questions=str(e2e / "questions.json"), annotations=str(e2e / "annotations.json"), image_root=".",
                protocol="original")
    assert okvqa.samples()[0].prompt == recorded.replace("What is thing 0?", "question 0?")
    assert okvqa.original_protocol
