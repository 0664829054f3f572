"""Your own data (tinygpt_v/data/custom.py, scripts/check_data.py): every way a row can be bad is
found, named with its line, left out and counted; mostly-bad data is refused before training;
the held-out split is a stable function of the sample id; the benchmark reads the same split."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest
from conftest import REPO, tiny_model_section
from PIL import Image

from tinygpt_v.data import build_dataset
from tinygpt_v.data.custom import (CustomDataset, TokenCounter, build_tokenizer, in_heldout, preflight,
                                   read_custom_file)
from tinygpt_v.registry import ConfigError

GOOD_QA = {"image": "a.jpg", "question": "what colour is it?", "answer": "red"}


def _spec(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_data = _spec(REPO / "scripts/check_data.py", "check_data_script")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue"), ("c.jpg", "green")):
        Image.new("RGB", (32, 32), colour).save(folder / name)
    (folder / "garbage.jpg").write_bytes(b"this is not a picture at all")
    (folder / "empty.jpg").write_bytes(b"")
    noise = Image.frombytes("RGB", (128, 128), random.Random(0).randbytes(128 * 128 * 3))
    noise.save(folder / "noise.jpg")
    whole = (folder / "noise.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header fine, pixels cut
    return folder


def write_jsonl(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def llava(image="a.jpg", *turns, id=None):
    record = {"image": image, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                                                 for i, v in enumerate(turns)]}
    return dict(record, id=id) if id is not None else record


def problems_of(path, fmt, image_root):
    source = read_custom_file(str(path), fmt, str(image_root))
    return [(p.line, p.kind) for p in source.problems], source


# --- every error path of the file check, with its line ----------------------------------------------

def test_qa_rows_each_problem_named_with_its_line(tmp_path, images):
    path = write_jsonl(tmp_path / "data.jsonl", [
        GOOD_QA,                                                              # 1 good
        '{"image": "b.jpg", "question": "broken',                             # 2 not JSON
        '["a list", "not a record"]',                                         # 3 not an object
        {"image": "b.jpg", "answer": "blue"},                                 # 4 no question
        {"question": "q?", "answer": "a"},                                    # 5 no image
        {"image": "b.jpg", "question": "q?", "answer": 3},                    # 6 answer not text
        {"image": "b.jpg", "question": "   ", "answer": "blue"},              # 7 empty question
        {"image": "b.jpg", "question": "which colour?", "answer": ""},        # 8 empty answer
        {"image": "b.jpg", "question": "is <image> blue?", "answer": "yes"},  # 9 marker mid-text
        {"image": "b.jpg", "question": "q?", "answer": "see <ImageHere>"},    # 10 the splice marker
        {"image": "nowhere.jpg", "question": "q?", "answer": "a"},            # 11 image file missing
        GOOD_QA,                                                              # 12 same as line 1
        {"id": "x", "image": "b.jpg", "question": "one?", "answer": "1"},     # 13 good
        {"id": "x", "image": "c.jpg", "question": "two?", "answer": "2"},     # 14 id used on 13
        "",                                                                   # blank lines are not rows
        {"image": "c.jpg", "question": "<image>\nwhat is it?", "answer": "green"},  # 16 good: leading <image>
    ])
    found, source = problems_of(path, "qa", images)
    assert found == [(2, "malformed_json"), (3, "not_an_object"), (4, "missing_field"), (5, "missing_field"),
                     (6, "missing_field"), (7, "empty_question"), (8, "empty_answer"), (9, "image_marker"),
                     (10, "image_marker"), (11, "missing_image"), (12, "duplicate"), (14, "duplicate_id")]
    assert [row.line for row in source.rows] == [1, 13, 16]
    assert source.rows[2].questions == ["what is it?"]
    assert source.total == 15
    assert "line 1" in next(p.detail for p in source.problems if p.kind == "duplicate")


def test_llava_rows_each_problem_named_with_its_line(tmp_path, images):
    records = [
        llava("a.jpg", "<image>\nWhat is it?", "A red square.", "Sure?", "Yes.", id="1"),   # good, 2 turns
        llava("a.jpg", "What is it?", "<image> red", id="2"),                # marker in an answer
        llava("a.jpg", "<image>\nfirst", "ok", "<image> again?", "no", id="3"),  # marker in turn 3
        llava("a.jpg", "<image><image> twice", "no", id="4"),                 # two markers
        llava("a.jpg", "<image> q", id="5"),                                  # no answer
        llava("a.jpg", "<image> q", "a", "dangling", id="6"),                 # odd number of turns
        {"id": "7", "image": "a.jpg",                                         # gpt speaks first
         "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "8", "image": "a.jpg"},                                        # no conversations
        {"id": "9", "image": "a.jpg", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        llava("a.jpg", "<image>", "a", id="10"),                              # nothing but the marker
        llava("a.jpg", "<image> q", "   ", id="11"),                          # empty answer
        llava("gone.jpg", "<image> q", "a", id="12"),                         # missing image
        "a string",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2))
    found, source = problems_of(path, "llava", images)
    kinds = [kind for _, kind in found]
    assert kinds == ["image_marker", "image_marker", "image_marker", "bad_conversation", "bad_conversation",
                     "bad_conversation", "missing_field", "missing_field", "empty_question", "empty_answer",
                     "missing_image", "not_an_object"]
    # each line number is where that record starts in the file
    text_lines = path.read_text().splitlines()
    for line, kind in found[:-1]:
        assert text_lines[line - 1].strip() == "{", (line, kind)
    assert text_lines[found[-1][0] - 1].strip().startswith('"a string"')
    assert [row.id for row in source.rows] == ["1"]
    assert source.rows[0].questions == ["What is it?", "Sure?"] and source.rows[0].answers == ["A red square.", "Yes."]


def test_a_json_file_that_does_not_parse_is_a_config_error_naming_line(tmp_path, images):
    path = tmp_path / "data.json"
    path.write_text('[\n {"id": "1",\n  "image": }\n]')
    with pytest.raises(ConfigError, match=r"data\.json: invalid JSON at line 3"):
        read_custom_file(str(path), "llava", str(images))
    path.write_text('{"id": "1"}')
    with pytest.raises(ConfigError, match="expected a JSON list"):
        read_custom_file(str(path), "llava", str(images))


def test_unreadable_images_fast_header_and_full_decode(tmp_path, images):
    path = write_jsonl(tmp_path / "data.jsonl", [
        GOOD_QA,
        {"image": "garbage.jpg", "question": "q1?", "answer": "a"},
        {"image": "empty.jpg", "question": "q2?", "answer": "a"},
        {"image": "truncated.jpg", "question": "q3?", "answer": "a"},
    ])
    dataset = build_dataset("mine", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": path,
                                     "image_root": str(images), "split": "all"})
    fast = preflight({"mine": dataset}, refuse=False)[0]
    assert [(p.line, p.kind) for p in fast.problems] == [(2, "unreadable_image"), (3, "unreadable_image")]
    full = preflight({"mine": dataset}, full=True, refuse=False)[0]  # the cut pixels only show when decoded
    assert [(p.line, p.kind) for p in full.problems] == [(2, "unreadable_image"), (3, "unreadable_image"),
                                                         (4, "unreadable_image")]
    assert "truncated_image" in full.problems[2].detail


# --- lengths in the model's tokens ---------------------------------------------------------------------

def test_token_count_equals_the_models_own_sequence(tiny_model, tmp_path, images):
    """The checker's count of a sample's regressed part is what TinyGPTV.build_sequence builds."""
    model_cfg = {"prompt_template": "[INST] {} [/INST] ", "end_sym": "###", "max_txt_len": 10_000}
    tiny_model.prompt_template, tiny_model.end_sym, tiny_model.max_txt_len = "[INST] {} [/INST] ", "###", 10_000
    path = tmp_path / "data.json"
    path.write_text(json.dumps([llava("a.jpg", "<image>\nwhat is it?", "a red square on white.",
                                      "and the background?", "white, mostly", id="1")]))
    dataset = build_dataset("mine", {"builder": "llava_json", "batch_size": 1, "ann_path": str(path),
                                     "image_root": str(images), "split": "all", "instruction": "[vqa] {}"})
    sample = dataset.load_checked(0, random.Random(0))
    prompts, answers = sample["prompt"], sample["answer"]
    full = tiny_model.build_sequence(prompts, answers, num_image_tokens=4)
    prompt_only = tiny_model.build_sequence(prompts[:1], None, num_image_tokens=4)
    counter = TokenCounter(tiny_model.tokenizer, model_cfg)
    assert counter.regressed(dataset.records[0], "[vqa] {}") == len(full.ids) - len(prompt_only.ids)


def test_over_long_samples_are_reported_against_max_txt_len(tmp_path, images):
    long_answer = " ".join(["the red square is on the left of the picture"] * 20)
    path = write_jsonl(tmp_path / "data.jsonl",
                       [GOOD_QA, {"image": "b.jpg", "question": "describe", "answer": long_answer}])
    dataset = build_dataset("mine", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": path,
                                     "image_root": str(images), "split": "all"})
    model = tiny_model_section(max_txt_len=32)
    report = preflight({"mine": dataset}, model=model, refuse=False)[0]
    assert [(p.line, p.kind) for p in report.problems] == [(2, "too_long")]
    assert "> max_txt_len 32" in report.problems[0].detail
    assert preflight({"mine": dataset}, build_tokenizer(model), model=dict(model, max_txt_len=4000),
                     refuse=False)[0].problems == []


# --- refusing mostly-bad data, in train.py's path --------------------------------------------------------

def _mostly_bad(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", [GOOD_QA] + [{"image": "b.jpg", "question": f"q{i}?", "answer": ""}
                                                             for i in range(3)])


def test_trainer_preflight_refuses_mostly_bad_data(tmp_path, images):
    from tinygpt_v.training.preflight import check_built_datasets
    options = {"builder": "qa_jsonl", "batch_size": 1, "ann_path": _mostly_bad(tmp_path), "image_root": str(images),
               "split": "all", "vis_processor": {"name": "blip2_image_train", "image_size": 112}}
    model = tiny_model_section()
    with pytest.raises(ConfigError, match=r"datasets\.mine: refusing the data.*3 bad \(75\.0%"):
        check_built_datasets(model, {"mine": build_dataset("mine", options)})
    lenient = build_dataset("mine", dict(options, max_bad_fraction=0.8))  # the threshold is the entry's
    check_built_datasets(model, {"mine": lenient})
    assert lenient.skips.as_dict() == {"empty_answer": 3}  # counted in the run's health summary


def test_a_split_without_rows_is_a_config_error(tmp_path, images):
    path = write_jsonl(tmp_path / "data.jsonl", [{"image": "b.jpg", "question": "q?", "answer": ""}])
    with pytest.raises(ConfigError, match=r"datasets\.mine\.ann_path: .*no usable rows"):
        build_dataset("mine", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": path, "image_root": str(images)})


# --- the held-out split --------------------------------------------------------------------------------------

def test_heldout_split_is_a_stable_function_of_the_id(tmp_path, images):
    records = [{"id": f"s{i}", "image": "a.jpg", "question": f"q{i}?", "answer": "a"} for i in range(400)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", random.Random(0).sample(records, len(records)))

    def ids(p, split):
        dataset = build_dataset("d", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": p, "split": split,
                                      "image_root": str(images), "heldout_fraction": 0.25})
        return {row.id for row in dataset.records}
    train, heldout = ids(path, "train"), ids(path, "heldout")
    assert not train & heldout and len(train | heldout) == 400
    assert 70 <= len(heldout) <= 130  # about a quarter
    assert heldout == ids(shuffled, "heldout")  # the row order does not matter
    assert heldout == {f"s{i}" for i in range(400) if in_heldout(f"s{i}", 0.25)}


def test_benchmark_scores_the_training_entrys_heldout_rows(tmp_path, images):
    from tinygpt_v.evaluation.benchmarks.custom import CustomVQA
    records = [{"id": f"s{i}", "image": "a.jpg", "question": f"q{i}?", "answer": ["red", "red", "dark red"]
                if i == 0 else "red"} for i in range(60)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    dataset = build_dataset("d", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": path, "split": "heldout",
                                  "image_root": str(images), "heldout_fraction": 0.3, "instruction": "[vqa] {}"})
    bench = CustomVQA(annotations=path, image_root=str(images), heldout_fraction=0.3, instruction="[vqa] {}")
    samples = bench.samples()
    assert [s.id for s in samples] == [row.id for row in dataset.records]
    trained = dataset.load_checked(0, random.Random(0))
    assert samples[0].prompt == trained["prompt"]  # asked exactly as taught
    rows = [{"prediction": p, "target": {"answers": ["red"]}} for p in ("red", " Red ", "red.", "blue")]
    # exact match: stripped, case-folded; VQA accuracy: one answer counts as ten identical human
    # answers, and only "red" as written matches them
    assert bench.score(rows, "official") == {"accuracy": 25.0, "exact_match": 50.0}


# --- scripts/check_data.py --------------------------------------------------------------------------------------

def _config(tmp_path, path, images, **entry):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "defaults": ["models/tiny.yaml"],
        "model": {"ckpt": str(tmp_path / "not_trained_yet"), "max_txt_len": 64},
        "datasets": {"mine": {"builder": "qa_jsonl", "batch_size": 2, "ann_path": path, "image_root": str(images),
                              **entry}}}))
    return str(cfg)


def test_check_data_prints_counts_and_first_bad_lines(tmp_path, images, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_QA, {"image": "b.jpg", "question": "q?", "answer": ""},
                                                 {"image": "c.jpg", "question": "q2?", "answer": "green"},
                                                 {"image": "missing.jpg", "question": "q3?", "answer": "x"}])
    assert check_data.main(["--cfg-path", _config(tmp_path, path, images), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 rows, 2 good, 2 bad" in out
    assert "empty_answer: 1" in out and "missing_image: 1" in out
    assert f"{path}:2: empty_answer" in out and ":4: missing_image" not in out  # --show 1
    assert "... and 1 more" in out and "OK: usable" in out


def test_check_data_exit_status_refused_and_config_error(tmp_path, images, capsys):
    bad = _mostly_bad(tmp_path)
    assert check_data.main(["--cfg-path", _config(tmp_path, bad, images), "--no-tokenizer"]) == 1
    assert "REFUSED: mine" in capsys.readouterr().out
    missing = _config(tmp_path, str(tmp_path / "nope.jsonl"), images)
    assert check_data.main(["--cfg-path", missing]) == 2
    assert "datasets.mine.ann_path" in capsys.readouterr().err


def test_shipped_configs_check_the_toy_export(tmp_path):
    from tinygpt_v.data.toy_world import export_custom_formats
    meta = export_custom_formats(str(tmp_path / "toy"), n_images=30)
    assert meta["images"] == 30
    for builder, name in (("qa_jsonl", "qa.jsonl"), ("llava_json", "llava.json")):
        options = ["--options", f"paths.data={tmp_path}/toy/{name}", f"paths.images={tmp_path}/toy",
                   f"datasets.custom.builder={builder}"]
        assert check_data.main(["--cfg-path", str(REPO / "train_configs/finetune_demo.yaml"), *options]) == 0
    both = [read_custom_file(f"{tmp_path}/toy/{n}", f, f"{tmp_path}/toy") for f, n in
            (("qa", "qa.jsonl"), ("llava", "llava.json"))]
    assert [r.id for r in both[0].split("heldout", 0.2)] == [r.id for r in both[1].split("heldout", 0.2)]
    assert isinstance(build_dataset("custom", {"builder": "qa_jsonl", "batch_size": 1,
                                               "ann_path": f"{tmp_path}/toy/qa.jsonl",
                                               "image_root": f"{tmp_path}/toy"}), CustomDataset)


# --- the shipped fine-tuning configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("train, evaluation", [("finetune", "finetune"), ("finetune_demo", "finetune_demo")])
def test_finetune_configs_load_and_split_alike(tmp_path, train, evaluation):
    """Training and evaluation configs validate, and select the same held-out rows, asked alike."""
    from tinygpt_v.config import load_config
    from tinygpt_v import evaluation as _  # noqa: F401  (registers the evaluation section)
    dummy = tmp_path / "ckpt.pth"
    dummy.write_bytes(b"")
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_QA])
    parts = ("vision", "qformer", "llm") if train == "finetune" else ()  # no weight files needed to load
    no_weights = [f"model.{part}.pretrained=null" for part in parts]
    common = [f"paths.data={data}", f"paths.images={tmp_path}", *no_weights]
    trained = load_config(REPO / f"train_configs/{train}.yaml", common + [f"model.ckpt={dummy}"])
    scored = load_config(REPO / f"eval_configs/{evaluation}.yaml", common + [f"evaluation.checkpoint={dummy}"])
    entry, bench = trained.datasets.custom, scored.evaluation.benchmarks.custom
    assert {"qa_jsonl": "qa", "llava_json": "llava"}[entry.builder] == bench.format
    assert (entry.ann_path, entry.image_root) == (bench.annotations, bench.image_root)
    assert (entry.heldout_fraction, entry.instruction) == (bench.heldout_fraction, bench.instruction)
    assert trained.model.prompt_template == scored.model.prompt_template
    assert entry.split == "train" and bench.split == "heldout"
    assert trained.run.get("gradient_checkpointing", False) == (train == "finetune")  # the 24 GB recipe


def test_llava_json_builds_the_samples_llava_conversation_builds(tmp_path, images):
    """Same file, same text: the custom builder adds checks and a split, not another format."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([llava("a.jpg", "What is\nit?\n<image>", "A red square.", "Sure?", "Yes.", id="1"),
                                llava("b.jpg", "<image>\nAnd this?", " Blue. ", id="2")]))
    options = {"batch_size": 1, "ann_path": str(path), "image_root": str(images)}
    ours = build_dataset("mine", dict(options, builder="llava_json", split="all"))
    theirs = build_dataset("llava_conversation", options)
    turns = lambda text: text if isinstance(text, list) else [text]  # noqa: E731  (collate's view)
    for index in range(2):
        a, b = ours.load_checked(index, random.Random(0)), theirs.load_checked(index, random.Random(0))
        assert (turns(a["prompt"]), turns(a["answer"]), a["id"]) == (b["prompt"], b["answer"], b["id"])


def test_an_instruction_without_a_slot_for_the_question_is_a_config_error(tmp_path, images):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_QA])
    with pytest.raises(ConfigError, match=r"datasets\.mine\.instruction: '\[vqa\]' has no \{\}"):
        build_dataset("mine", {"builder": "qa_jsonl", "batch_size": 1, "ann_path": path, "image_root": str(images),
                               "instruction": "[vqa]"})


def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path, images):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(dict(GOOD_QA, id=0)).encode() + b"\n" +
                     b'{"image": "b.jpg", "question": "caf\xe9?", "answer": "x"}\n' +
                     json.dumps({"image": "c.jpg", "question": "q?", "answer": "green"}).encode() + b"\n")
    found, source = problems_of(path, "qa", images)
    assert found == [(2, "malformed_json")] and "UTF-8" in source.problems[0].detail
    assert [row.id for row in source.rows] == ["0", "c.jpg|q?"]  # id 0 is an id; no id: image and question
