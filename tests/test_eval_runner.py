"""The prediction runner with a scripted model: outputs, resume after interruption, settings guard,
likelihood ranking, the `evaluation:` config section and eval.py."""
import json
from pathlib import Path

import pytest
from PIL import Image

import eval as eval_script
from tinygpt_v.config import load_config
from tinygpt_v.evaluation import EvalSettings, build_benchmarks, evaluate
from tinygpt_v.evaluation.scripted import Interrupted, ScriptedModel
from tinygpt_v.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]

# GQA questions and the scripted replies. official (exact match): "yes" and "red" -> 2/5 = 40 %;
# original (label inside the reply): yes, red in "The car is red", "no" in "not sure", red -> 80 %.
# Replies that are right or wrong under any answer clean-up, so these tests check the runner.
GQA_QUESTIONS = {
    "201": ("n1", "Is the sky blue?", "yes", "verify", "yes"),
    "202": ("n2", "What color is the car?", "red", "query", "The car is red"),
    "203": ("n3", "What is on the table?", "cup", "query", ""),
    "204": ("n4", "Is it raining?", "no", "verify", "not sure"),
    "205": ("n5", "What color is the bus?", "red", "query", "red"),
}
REPLIES = {question: reply for _, question, _, _, reply in GQA_QUESTIONS.values()}


def write_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def make_gqa(root: Path) -> dict:
    questions = {qid: {"imageId": image, "question": question, "answer": answer, "types": {"structural": kind}}
                 for qid, (image, question, answer, kind, _) in GQA_QUESTIONS.items()}
    (root / "gqa.json").write_text(json.dumps(questions))
    for image, *_ in GQA_QUESTIONS.values():
        write_image(root / "images" / f"{image}.jpg")
    return {"gqa": {"name": "gqa", "questions": str(root / "gqa.json"), "image_root": str(root / "images")}}


def settings_for(root: Path, output: str = "out", **overrides) -> EvalSettings:
    values = {"benchmarks": make_gqa(root), "output_dir": str(root / output), "scoring": "both", "batch_size": 2}
    return EvalSettings(**{**values, **overrides})


def run(settings: EvalSettings, model) -> dict:
    return evaluate(model, build_benchmarks(settings), settings, show_progress=False)


def test_evaluation_writes_predictions_summary_and_table(tmp_path, capsys):
    settings = settings_for(tmp_path)
    model = ScriptedModel(REPLIES)
    summary = run(settings, model)

    gqa = summary["benchmarks"]["gqa"]
    assert gqa["samples"] == 5
    assert gqa["official"]["accuracy"] == pytest.approx(40.0)
    assert gqa["original"]["accuracy"] == pytest.approx(80.0)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "gqa.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(GQA_QUESTIONS)
    assert rows[1]["prediction"] == "The car is red" and rows[1]["target"]["answer"] == "red"
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "summary.md").read_text()
    assert "| gqa | accuracy | 40.00 | 80.00 | 5 |" in table
    assert "accuracy/verify" not in table  # breakdowns stay in the JSON
    assert "| gqa | accuracy | 40.00 | 80.00 | 5 |" in capsys.readouterr().out
    assert not list(out.glob("gqa.rank*.jsonl"))  # parts merged away
    assert len(model.seen) == 5


def test_each_benchmark_reports_the_scorings_it_offers(tmp_path):
    # lavis_vqa offers "evalai", GQA does not: its column shows "-".
    questions = [{"question_id": 7, "question": "What is it?", "image": "a.jpg", "answer": ["dog"] * 10}]
    (tmp_path / "vqa.json").write_text(json.dumps(questions))
    write_image(tmp_path / "vqaimg" / "a.jpg")
    benchmarks = {**make_gqa(tmp_path), "toy": {"name": "lavis_vqa", "annotations": str(tmp_path / "vqa.json"),
                                                "image_root": str(tmp_path / "vqaimg")}}
    settings = settings_for(tmp_path, benchmarks=benchmarks, scoring="official,evalai")
    # "The dog." against ten "dog": official compares unnormalised (humans agree) -> 0; evalai normalises -> 1
    summary = run(settings, ScriptedModel({**REPLIES, "What is it?": "The dog."}))
    assert summary["scorings"] == ["official", "evalai"]
    assert summary["benchmarks"]["toy"]["official"]["accuracy"] == 0.0
    assert summary["benchmarks"]["toy"]["evalai"]["accuracy"] == 100.0
    assert "evalai" not in summary["benchmarks"]["gqa"]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| toy | accuracy | 0.00 | 100.00 | 1 |" in table
    assert "| gqa | accuracy | 40.00 | - | 5 |" in table


@pytest.mark.parametrize("scoring,expected", [
    ("both", ["official", "original"]), ("official", ["official"]), ("evalai, original", ["evalai", "original"]),
    (["original", "lenient"], ["original", "lenient"]), ("all", ["official", "original", "evalai", "lenient"])])
def test_scoring_names(scoring, expected):
    assert EvalSettings(benchmarks={}, scoring=scoring).scorings == expected


def test_a_scoring_a_benchmark_lacks_is_refused_by_the_benchmark(tmp_path):
    gqa = build_benchmarks(settings_for(tmp_path))["gqa"]
    with pytest.raises(ValueError, match="GQA has no scoring 'evalai'; it offers: official, original"):
        gqa.score([], "evalai")


def test_interrupted_evaluation_resumes_without_redoing_samples(tmp_path):
    full = run(settings_for(tmp_path, output="uninterrupted"), ScriptedModel(REPLIES))

    settings = settings_for(tmp_path, output="interrupted")
    with pytest.raises(Interrupted):
        run(settings, ScriptedModel(REPLIES, stop_after_batches=1))  # killed after the first batch of 2
    assert len((tmp_path / "interrupted" / "gqa.rank0.jsonl").read_text().splitlines()) == 2

    resumed_model = ScriptedModel(REPLIES)
    resumed = run(settings, resumed_model)
    questions = [q for _, q, *_ in GQA_QUESTIONS.values()]
    assert [p.rsplit(": ", 1)[1] for p in resumed_model.seen] == questions[2:]  # only the 3 left
    assert resumed == full


def test_a_partly_written_last_line_is_predicted_again(tmp_path):
    settings = settings_for(tmp_path)
    with pytest.raises(Interrupted):
        run(settings, ScriptedModel(REPLIES, stop_after_batches=1))
    with open(tmp_path / "out" / "gqa.rank0.jsonl", "a") as f:
        f.write('{"id": "203", "prompt": "<Img>')  # the run was killed while writing
    model = ScriptedModel(REPLIES)
    with pytest.warns(UserWarning, match="partly written"):
        summary = run(settings, model)
    assert len(model.seen) == 3
    assert summary["benchmarks"]["gqa"]["official"]["accuracy"] == pytest.approx(40.0)


def test_resuming_with_other_generation_settings_is_refused(tmp_path):
    run(settings_for(tmp_path), ScriptedModel(REPLIES))
    with pytest.raises(ConfigError, match=r"evaluation.output_dir: .*max_new_tokens: \[20\] -> \[5\]"):
        run(settings_for(tmp_path, max_new_tokens=5), ScriptedModel(REPLIES))


def test_limit_evaluates_the_first_samples(tmp_path):
    summary = run(settings_for(tmp_path, limit=2), ScriptedModel(REPLIES))
    # 201 "yes" right, 202 "The car is red" wrong -> 50 % official; both right in the original scoring
    assert summary["benchmarks"]["gqa"]["samples"] == 2
    assert summary["benchmarks"]["gqa"]["official"]["accuracy"] == pytest.approx(50.0)
    assert summary["benchmarks"]["gqa"]["original"]["accuracy"] == pytest.approx(100.0)


def test_likelihood_benchmark_ranks_candidates(tmp_path):
    problems = {"1": {"question": "How many dots?", "choices": ["2", "3"], "answer": 1},
                "2": {"question": "Which shape?", "choices": ["circle", "square"], "answer": 0},
                "3": {"question": "How many sides?", "choices": ["3", "4"], "answer": 1}}
    for pid, problem in problems.items():
        problem.update(ques_type="choose_txt", split="test")
        write_image(tmp_path / "iconqa" / "test" / "choose_txt" / pid / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    settings = EvalSettings(benchmarks={"iconqa": {"problems": str(tmp_path / "problems.json"),
                                                   "image_root": str(tmp_path / "iconqa")}},
                            output_dir=str(tmp_path / "out"))
    model = ScriptedModel({"dots": "3", "shape": "square", "sides": "4"})  # the candidate each prefers
    summary = run(settings, model)
    rows = [json.loads(line) for line in (tmp_path / "out" / "iconqa.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["3", "square", "4"]
    assert summary["benchmarks"]["iconqa"]["official"]["accuracy"] == pytest.approx(200 / 3)


# --- the evaluation: config section --------------------------------------------------------------

def write_config(tmp_path: Path, evaluation: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text("evaluation:\n" + evaluation)
    return path


def test_only_selected_benchmarks_need_their_files(tmp_path):
    make_gqa(tmp_path)
    path = write_config(tmp_path, f"""
  data_root: {tmp_path}
  select: [gqa]
  benchmarks:
    gqa: {{questions: "${{evaluation.data_root}}/gqa.json", image_root: "${{evaluation.data_root}}/images"}}
    vsr: {{annotations: /nowhere/test.jsonl, image_root: /nowhere}}
""")
    cfg = load_config(path)
    assert cfg.evaluation.benchmarks.gqa.questions == f"{tmp_path}/gqa.json"
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks.vsr.annotations: path does not exist"):
        load_config(path, ["evaluation.select=[gqa,vsr]"])


@pytest.mark.parametrize("entry,key,message", [
    ("gqa: {questons: $/q.json, image_root: $}", "evaluation.benchmarks.gqa.questons", "did you mean 'questions'"),
    ("gqa: {name: gqaa, questions: $/q.json}", "evaluation.benchmarks.gqa.name", "did you mean 'gqa'"),
    ("ref: {name: refcoco, image_root: $, annotations: $/q.json, refs: $/q.json}", "evaluation.benchmarks.ref",
     "either `annotations`"),
    ("vqa: {name: vqav2, questions: $/q.json, annotations: $/q.json, image_root: $, batch_size: two}",
     "evaluation.benchmarks.vqa.batch_size", "expected int"),
])
def test_config_errors_name_the_key(tmp_path, entry, key, message):
    (tmp_path / "q.json").write_text("{}")
    path = write_config(tmp_path, f"  benchmarks:\n    {entry.replace('$', str(tmp_path))}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.key == key and message in error.value.message
    assert error.value.file == str(path)


def test_unknown_selection_and_scoring_are_named(tmp_path):
    path = write_config(tmp_path, "  scoring: official,evali\n  benchmarks: {}\n")
    with pytest.raises(ConfigError, match=r"evaluation.scoring: unknown scoring 'evali'; known: official, original, "
                                          r"evalai, lenient, both, all"):
        load_config(path)
    path = write_config(tmp_path, "  benchmarks: {}\n")
    with pytest.raises(ConfigError, match=r"evaluation.select\[0\]: no benchmark 'gqa'"):
        load_config(path, ["evaluation.select=[gqa]"])


@pytest.mark.parametrize("suite", ["benchmarks.yaml", "benchmarks_original.yaml", "demo.yaml"])
def test_shipped_suites_are_valid(suite):
    # Their data is not on this machine: check the section's keys and types, and every entry's
    # keys against its benchmark, without requiring the files.
    import inspect

    from tinygpt_v.evaluation.settings import read_settings
    from tinygpt_v.registry import BENCHMARKS
    cfg = load_config(REPO / "eval_configs" / suite, ["evaluation.select=[]", "evaluation.checkpoint=null"],
                      validate=False)
    read_settings(cfg.evaluation)
    for key, entry in cfg.evaluation.benchmarks.items():
        benchmark = BENCHMARKS.get(entry.get("name", key))
        assert set(entry) - {"name"} <= set(inspect.signature(benchmark).parameters), key
    if suite == "benchmarks_original.yaml":  # every entry of the paper suite, each in the original protocol
        paper = load_config(REPO / "eval_configs/benchmarks.yaml", ["evaluation.select=[]"], validate=False)
        assert set(cfg.evaluation.benchmarks) == set(paper.evaluation.benchmarks)
        assert {entry.protocol for entry in cfg.evaluation.benchmarks.values()} == {"original"}
    if suite == "benchmarks.yaml":
        assert {"gqa", "vsr", "iconqa", "vizwiz", "hateful_memes", "okvqa", "vqav2", "refcoco_val",
                "refcoco+_testA", "refcocog_test"} <= set(cfg.evaluation.benchmarks)


# --- eval.py -----------------------------------------------------------------------------------

def test_eval_script_runs_selected_benchmarks_and_prints_the_table(tmp_path, monkeypatch, capsys):
    make_gqa(tmp_path)
    path = write_config(tmp_path, f"""
  output_dir: {tmp_path / "out"}
  scoring: official
  benchmarks:
    gqa: {{questions: {tmp_path}/gqa.json, image_root: {tmp_path}/images}}
    vsr: {{annotations: /nowhere/test.jsonl, image_root: /nowhere}}
""")
    monkeypatch.setattr("tinygpt_v.evaluation.loading.load_model", lambda cfg, settings, device: ScriptedModel(REPLIES))
    assert eval_script.main(["--cfg-path", str(path), "--benchmarks", "gqa"]) == 0
    assert "| gqa | accuracy | 40.00 | 5 |" in capsys.readouterr().out

    assert eval_script.main(["--cfg-path", str(path), "--benchmarks", "gqa,vqa"]) == 2
    assert "evaluation.select[1]: no benchmark 'vqa'" in capsys.readouterr().err


# --- VQAv2 test-dev: the EvalAI submission file ---------------------------------------------------

def write_testdev(root: Path, question_ids) -> Path:
    questions = [{"image_id": 10 + i, "question": f"How many things {i}?", "question_id": qid}
                 for i, qid in enumerate(question_ids)]
    path = root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    path.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                "data_subtype": "test-dev2015", "license": {}, "questions": questions}))
    for i in range(len(question_ids)):
        write_image(root / "test2015" / f"COCO_test2015_{10 + i:012d}.jpg")
    return path


def test_vqav2_test_dev_run_writes_the_submission(tmp_path):
    questions = write_testdev(tmp_path, [4195880, 4195881, 262144000])
    entry = {"name": "vqav2", "questions": str(questions), "annotations": None,
             "image_root": str(tmp_path / "test2015"), "image_pattern": "COCO_test2015_{image_id:012d}.jpg"}
    settings = settings_for(tmp_path, benchmarks={"vqav2_testdev": entry}, scoring="official,evalai")
    replies = {"How many things 0?": "Two.", "How many things 1?": "The Red Car", "How many things 2?": "dont know"}
    summary = run(settings, ScriptedModel(replies))
    path = tmp_path / "out" / "vqav2_testdev_submission.json"
    assert summary["benchmarks"]["vqav2_testdev"] == {"samples": 3, "outputs": [str(path)]}  # nothing to score
    # EvalAI's results format: a list of {"question_id": int, "answer": str}, every test-dev question,
    # answers normalised as the server normalises predictions (so any VQA scorer reads them alike).
    assert json.loads(path.read_text()) == [{"question_id": 4195880, "answer": "2"},
                                            {"question_id": 4195881, "answer": "red car"},
                                            {"question_id": 262144000, "answer": "don't know"}]


def test_submission_refuses_missing_unknown_and_repeated_questions(tmp_path):
    from tinygpt_v.evaluation.benchmark import BenchmarkDataError
    from tinygpt_v.evaluation.benchmarks.vqa import write_submission
    questions = write_testdev(tmp_path, [11, 12, 13])
    out = tmp_path / "submission.json"
    with pytest.raises(BenchmarkDataError, match=r"test-dev2015_questions.json: 1 questions have no prediction "
                                                 r"\(first: 13\)"):
        write_submission([{"id": "11", "prediction": "a"}, {"id": "12", "prediction": "b"}], str(questions), str(out))
    with pytest.raises(BenchmarkDataError, match=r"1 predictions name questions not in .*\(first: 99\)"):
        write_submission([{"id": str(q), "prediction": "a"} for q in (11, 12, 13, 99)], str(questions), str(out))
    with pytest.raises(BenchmarkDataError, match=r"prediction row 1: question_id 11 occurs twice"):
        write_submission([{"id": "11", "prediction": "a"}, {"id": 11, "prediction": "b"}], str(questions), str(out))
    assert not out.exists()
    rows = [{"id": str(q), "prediction": "yes"} for q in (13, 11, 12)]
    assert [r["question_id"] for r in write_submission(rows, str(questions), str(out))] == [11, 12, 13]
