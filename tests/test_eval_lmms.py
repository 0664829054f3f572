"""The lmms-eval plugin runs lmms-eval tasks on our model: a toy generation task written
offline, answered by a scripted model; and the plugin's log-likelihood requests.

lmms-eval is an optional extra (`pip install 'tinygpt_v[lmms]'`); without it this test skips."""
import json
import textwrap

import pytest
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install 'tinygpt_v[lmms]')")

from tinygpt_v.evaluation.scripted import ScriptedModel  # noqa: E402

QUESTIONS = [("what colour is the square?", "red"), ("what colour is the circle?", "blue"),
             ("what colour is the triangle?", "green")]
# The model knows two of the three: 2/3.
REPLIES = {"square": "red", "circle": "blue"}

TASK = """
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
task: {name}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
UTILS = """
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "<image>" + doc["question"]
"""


@pytest.fixture
def toy_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    records = []
    for i, (question, answer) in enumerate(QUESTIONS):
        image = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(image)
        records.append({"id": i, "image": str(image), "question": question, "answer": answer})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent(UTILS))
    (tasks / "toy_generate.yaml").write_text(TASK.format(
        data=data, name="toy_generate", output_type="generate_until", metric="exact_match",
        extra='doc_to_target: answer\ngeneration_kwargs: {max_new_tokens: 5, until: ["\\n"]}'))
    return tasks


def test_lmms_eval_runs_a_toy_task_on_the_plugin(toy_tasks):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tinygpt_v.evaluation.lmms_plugin import TinyGPTV

    scripted = ScriptedModel(REPLIES, image_size=16)
    results = simple_evaluate(model=TinyGPTV(model=scripted, batch_size=2), tasks=["toy_generate"],
                              task_manager=TaskManager(include_path=str(toy_tasks)), log_samples=False)
    assert results["results"]["toy_generate"]["exact_match,none"] == pytest.approx(2 / 3)
    # lmms-eval's <image> became our image marker; one image per prompt.
    assert "<Img><ImageHere></Img>what colour is the square?" in scripted.seen


def test_loglikelihood_requests_score_the_continuation(tmp_path):
    # (lmms-eval 0.7.3 itself turns log-likelihood results into strings before multiple-choice
    # scoring, so this asks the plugin directly.)
    from lmms_eval.api.instance import Instance

    from tinygpt_v.evaluation.lmms_plugin import TinyGPTV

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    plugin = TinyGPTV(model=ScriptedModel(REPLIES, image_size=16))
    plugin.task_dict = {"toy": {"test": [{"image": str(tmp_path / "a.png")}]}}

    def visual(doc):
        return [Image.open(doc["image"])]
    requests = [Instance("loglikelihood", ("what colour is the square?", " " + colour, visual, 0, "toy", "test"),
                         idx=i, metadata={"task": "toy", "doc_id": 0, "repeats": 1})
                for i, colour in enumerate(["red", "blue"])]
    # ScriptedModel scores its own answer 0 and any other -1; the leading delimiter is dropped.
    assert plugin.loglikelihood(requests) == [(0.0, False), (-1.0, False)]


def test_entry_point_manifest_names_the_plugin_class():
    from tinygpt_v.evaluation.lmms_plugin import TinyGPTV, manifest

    m = manifest()
    assert m.model_id == "tinygpt_v"
    assert m.simple_class_path == f"{TinyGPTV.__module__}.TinyGPTV"
