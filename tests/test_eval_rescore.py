"""eval.py --rescore: predictions files of our runner, lmms-eval and VLMEvalKit, scored without a
model, end to end against the reference scorers' own aggregates.

tests/fixtures/scorers/vqa/e2e/ holds OK-VQA-format questions/annotations, the same 40 replies in
each framework's format (VLMEvalKit's written by pandas + xlsxwriter as its `dump` does) and
`reference.json`: the overall and per-answer-type accuracy the GT-Vision-Lab, Cloud-CV, LAVIS and
bundled-TinyGPT-V scorers printed on them (tests/fixtures/make_vqa_scorer_fixtures.py --e2e).
"""
import csv
import json
from pathlib import Path

import pytest

import eval as eval_script

E2E = Path(__file__).parent / "fixtures" / "scorers" / "vqa" / "e2e"
REFERENCE = json.loads((E2E / "reference.json").read_text())["accuracy"]
FORMATS = ["ours.jsonl", "lmms_eval_samples.jsonl", "vlmevalkit.xlsx", "vlmevalkit.tsv"]


def suite(tmp_path: Path, questions: Path = E2E / "questions.json",
          annotations: Path = E2E / "annotations.json") -> str:
    config = tmp_path / "suite.yaml"
    config.write_text(f"""evaluation:
  scoring: official,evalai,original
  benchmarks:
    okvqa: {{questions: {questions}, annotations: {annotations}, image_root: {tmp_path / 'no-images'}}}
    toy: {{name: lavis_vqa, annotations: {questions}, image_root: .}}
""")
    return str(config)


def rescore(tmp_path, predictions, *extra, benchmark="okvqa"):
    out = tmp_path / "scores.json"
    code = eval_script.main(["--cfg-path", suite(tmp_path), "--rescore", str(predictions), "--benchmark", benchmark,
                             "--output", str(out), *extra])
    return code, (json.loads(out.read_text())["benchmarks"][benchmark] if code == 0 else None)


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rescoring must not load a model")
    monkeypatch.setattr("tinygpt_v.evaluation.loading.load_model", refuse)


@pytest.mark.parametrize("predictions", FORMATS + ["vlmevalkit.csv"])
def test_every_format_gives_the_reference_aggregates(tmp_path, predictions, capsys):
    path = E2E / predictions
    if predictions.endswith(".csv"):  # VLMEvalKit's csv: the tsv's table, comma-separated
        path = tmp_path / predictions
        with open(E2E / "vlmevalkit.tsv", newline="", encoding="utf-8") as f:
            table = list(csv.reader(f, delimiter="\t"))
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows(table)
    code, result = rescore(tmp_path, path)
    assert code == 0
    assert result["samples"] == 40
    for scoring in ("official", "evalai", "original"):
        assert round(result[scoring]["accuracy"], 2) == REFERENCE[scoring]["overall"], scoring
        for answer_type, value in REFERENCE[scoring]["perAnswerType"].items():
            assert round(result[scoring][f"accuracy/{answer_type}"], 2) == value, (scoring, answer_type)
    assert REFERENCE["evalai"] == REFERENCE["lavis"]  # LAVIS's copy scores as the EvalAI server
    table = capsys.readouterr().out
    assert f"| okvqa | accuracy | {REFERENCE['official']['overall']:.2f} |" in table


def test_the_references_disagree_on_these_files():
    # Otherwise the test above could not tell the scorers apart.
    overall = {name: REFERENCE[name]["overall"] for name in ("official", "evalai", "original")}
    assert len(set(overall.values())) == 3, overall


def test_default_scorings_come_from_the_config(tmp_path):
    code, result = rescore(tmp_path, E2E / "ours.jsonl")
    assert code == 0 and set(result) == {"samples", "official", "evalai", "original"}


def write_rows(path: Path, ids_and_replies) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prediction": r}) + "\n" for i, r in ids_and_replies))
    return path


def all_ids():
    return [str(q["question_id"]) for q in json.loads((E2E / "questions.json").read_text())["questions"]]


def test_duplicate_id_names_file_and_line(tmp_path, capsys):
    ids = all_ids()
    path = write_rows(tmp_path / "p.jsonl", [(i, "yes") for i in ids] + [(ids[3], "no")])
    assert rescore(tmp_path, path)[0] == 2
    err = capsys.readouterr().err
    assert f"p.jsonl:41: id {ids[3]} occurs twice (first at {path}:4)" in err


def test_unknown_id_names_file_and_line(tmp_path, capsys):
    ids = all_ids()
    path = write_rows(tmp_path / "p.jsonl", [(i, "yes") for i in ids[:2]] + [("999999", "no")])
    assert rescore(tmp_path, path)[0] == 2
    assert f"{path}:3: id 999999 is not a sample of the benchmark" in capsys.readouterr().err


def test_missing_ids_are_counted_and_named(tmp_path, capsys):
    ids = all_ids()
    path = write_rows(tmp_path / "p.jsonl", [(i, "yes") for i in ids[:-2]])
    assert rescore(tmp_path, path)[0] == 2
    assert f"{path}: 2 of 40 samples have no prediction (first: {ids[-2]}, {ids[-1]})" in capsys.readouterr().err


def test_lmms_eval_record_without_the_id_asks_for_id_key(tmp_path, capsys):
    records = [json.loads(line) for line in (E2E / "lmms_eval_samples.jsonl").read_text().splitlines()]
    for r in records:
        r["doc"]["qid"] = r["doc"].pop("question_id")
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert rescore(tmp_path, path)[0] == 2
    assert f"{path}:1: no id (doc.question_id / id / index); pass --id-key" in capsys.readouterr().err
    code, result = rescore(tmp_path, path, "--id-key", "qid")
    assert code == 0 and round(result["official"]["accuracy"], 2) == REFERENCE["official"]["overall"]


def test_older_lmms_eval_json_with_logs(tmp_path):
    records = [json.loads(line) for line in (E2E / "lmms_eval_samples.jsonl").read_text().splitlines()]
    for r in records:  # older versions: filtered_resps held the response list
        r["filtered_resps"] = [r["resps"][0]]
    path = tmp_path / "okvqa.json"
    path.write_text(json.dumps({"args": {}, "logs": records}))
    code, result = rescore(tmp_path, path)
    assert code == 0 and round(result["evalai"]["accuracy"], 2) == REFERENCE["evalai"]["overall"]


def test_a_scoring_the_benchmark_lacks_and_bad_files_are_errors(tmp_path, capsys):
    assert rescore(tmp_path, E2E / "ours.jsonl", "--scoring", "official,bogus")[0] == 2
    assert "--scoring: unknown scoring 'bogus'" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("x")
    assert rescore(tmp_path, tmp_path / "p.txt")[0] == 2
    assert "p.txt: unknown predictions format '.txt'" in capsys.readouterr().err
    assert rescore(tmp_path, tmp_path / "absent.jsonl")[0] == 2
    assert "absent.jsonl: predictions file not found" in capsys.readouterr().err
    assert eval_script.main(["--cfg-path", suite(tmp_path), "--rescore", str(E2E / "ours.jsonl"),
                             "--benchmark", "nope"]) == 2
    assert "no benchmark 'nope' (--benchmark); configured: okvqa, toy" in capsys.readouterr().err


def test_a_test_split_rescored_gives_the_submission_file(tmp_path, capsys):
    # lmms-eval's samples for questions without annotations (VQAv2 test-dev): nothing to score,
    # the EvalAI file is written next to --output, every question present.
    config = tmp_path / "suite.yaml"
    config.write_text(f"""evaluation:
  benchmarks:
    vqav2_testdev: {{name: vqav2, questions: {E2E / 'questions.json'}, annotations: null, image_root: .}}
""")
    out = tmp_path / "scores.json"
    assert eval_script.main(["--cfg-path", str(config), "--rescore", str(E2E / "lmms_eval_samples.jsonl"),
                             "--benchmark", "vqav2_testdev", "--output", str(out)]) == 0
    submission = json.loads((tmp_path / "vqav2_testdev_submission.json").read_text())
    assert [r["question_id"] for r in submission] == [int(i) for i in all_ids()]
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in submission)
    assert "wrote " in capsys.readouterr().out
    assert json.loads(out.read_text())["benchmarks"]["vqav2_testdev"]["samples"] == 40

