"""Reliability of the data path (issue 13 items 2, 3 and 12; issue 20 item 6).

* Item 2: text holding the literal `<ImageHere>` (or a prompt with the wrong number of markers)
  is skipped and counted by the data path, for every dataset kind, so training goes past it.
* Item 3: annotation records that are not objects, and bytes that are not UTF-8, are skipped
  and counted (naming file and index / line) or are one start-up error naming the file.
* Item 12: skip and error messages name the shard and sample key (webdataset), the image file
  and record (map datasets), or the benchmark, sample and image file (evaluation), for
  truncated, empty, mislabelled, non-image and decompression-bomb images.
* The loader's data-health summary: samples used and skipped by reason, per dataset.

Every fixture here is a handful of tiny files written into tmp_path.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_section
from omegaconf import OmegaConf
from PIL import Image

from tinygpt_v.data import build_processor, build_train_loader
from tinygpt_v.data.base import IMAGE_PLACEHOLDER, SkipSample, check_sample_text, require_objects
from tinygpt_v.data.pairs import WebDatasetPairs
from tinygpt_v.evaluation import BenchmarkDataError, EvalSettings, build_benchmarks, evaluate
from tinygpt_v.evaluation.images import BadImageError, image_transform, load_image
from tinygpt_v.evaluation.scripted import ScriptedModel
from tinygpt_v.models.tinygpt_v import TinyGPTV
from tinygpt_v.registry import ConfigError

VIS = {"name": "blip2_image_eval", "image_size": 16}
MARKER = "<ImageHere>"
NOT_OBJECTS = ["a string", 7, None, [1, 2]]  # what a hand-edited or concatenated file may hold


# --- tiny files --------------------------------------------------------------------------------

def jpeg_bytes(seed: int = 0, size: int = 48) -> bytes:
    """Noise compresses badly, so half of the file is well past the headers."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(seed: int = 0, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb) with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


BAD_IMAGES = {  # name -> (file bytes, the skip reason it must get)
    "truncated": (jpeg_bytes(1)[: len(jpeg_bytes(1)) * 2 // 3], "truncated_image"),
    "truncated_png": (png_bytes(2, size=24)[: len(png_bytes(2, size=24)) * 3 // 4], "truncated_image"),
    "empty": (b"", "empty_file"),
    "not_an_image": (b"this is a text file with a .jpg name\n" * 4, "unreadable_image"),
    "bomb": (png_header_only(20_000, 20_000), "decompression_bomb"),
}


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(n, size=16))


def loader_for(entry: dict, builder: str):
    return build_train_loader({"data": {"builder": builder, "batch_size": 1, **entry}}, seed=0)


def draw(loader, n: int) -> list[str]:
    return [next(loader)["id"][0] for _ in range(n)]


def skip_messages(caplog, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"({reason}, " in r.getMessage()]


# --- item 2: a literal <ImageHere> in the text -----------------------------------------------------

def test_marker_in_vqa_text_is_skipped_and_training_goes_past_it(tmp_path):
    """The run of the audit: with such a record, forward raised at the same step on every resume."""
    from tinygpt_v.training.trainer import Trainer
    write_images(tmp_path / "images", [f"im{i}" for i in range(6)])
    records = [{"question_id": i, "question": f"what is in picture {i}?", "answer": ["a shape"], "image": f"im{i}.jpg"}
               for i in range(6)]
    records[1]["answer"] = [f"the prompt was {MARKER}"]
    records[3]["question"] = f"what does {MARKER} show?"
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    # the model itself refuses such a prompt: without the data check this step would raise
    with pytest.raises(ValueError, match="markers"):
        TinyGPTV.check_markers([[f"{IMAGE_PLACEHOLDER} {records[3]['question']}"]], has_images=True)
    config = {
        "model": tiny_model_section(**{"vision.image_size": 28, "lora.dropout": 0.0}),
        "datasets": {"coco_vqa": {"batch_size": 2, "text_processor": None, "ann_paths": [str(tmp_path / "vqa.json")],
                                  "vis_processor": {"name": "blip2_image_train", "image_size": 28},
                                  "image_root": str(tmp_path / "images")}},
        "run": {"output_dir": str(tmp_path / "run"), "lr_sched": "constant_lr", "init_lr": 1e-4, "max_epoch": 1,
                "iters_per_epoch": 4, "device": "cpu", "cpu_threads": 1, "wandb": False, "tensorboard": False,
                "log_every": 1, "seed": 0, "resume": "auto"},
    }
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(OmegaConf.create(config))
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in steps)
    counts = trainer.loader.skip_counts()["coco_vqa"]
    assert set(counts) == {"stray_image_marker"} and counts["stray_image_marker"] >= 2  # 8 samples of 6 records
    assert any("stray_image_marker" in line for line in trainer.loader.health_summary())


def _caption_set(tmp_path: Path) -> tuple[dict, str, set[str]]:
    write_images(tmp_path / "image", ["good0", "good1", "bad"])
    annotations = [{"image_id": "good0", "caption": "a red square"},
                   {"image_id": "bad", "caption": f"see {MARKER} here"},
                   {"image_id": "good1", "caption": "a blue circle"}]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    entry = {"vis_processor": VIS, "ann_path": str(tmp_path / "filter_cap.json"), "image_root": str(tmp_path / "image")}
    return entry, "cc_sbu_align", {"good0", "good1"}


def _conversation_set(tmp_path: Path) -> tuple[dict, str, set[str]]:
    write_images(tmp_path / "images", ["c0", "c1", "c2", "c3"])
    def record(name, q2="and the colour?", a2="red"):
        return {"id": name, "image": f"{name}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a square"},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]}
    records = [record("c0"), record("c1", q2=f"is {MARKER} a token?"), record("c2", a2=f"it says {MARKER}"),
               record("c3")]
    (tmp_path / "conversation.json").write_text(json.dumps(records))
    entry = {"vis_processor": VIS, "ann_path": str(tmp_path / "conversation.json"),
             "image_root": str(tmp_path / "images")}
    return entry, "llava_conversation", {"c0", "c3"}


def _text_only_set(tmp_path: Path) -> tuple[dict, str, set[str]]:
    def record(instruction):
        return {"instruction": "x", "instances": [{"instruction_with_input": instruction, "constraints": None,
                                                   "output": "done"}]}
    lines = [record("Say hi."), record(f"Repeat {MARKER} twice."), record("Say bye.")]
    (tmp_path / "core_data.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return {"ann_path": str(tmp_path / "core_data.jsonl")}, "unnatural_instruction", {"0", "2"}


@pytest.mark.parametrize("make", [_caption_set, _conversation_set, _text_only_set], ids=["caption", "conversation",
                                                                                        "text_only"])
def test_marker_in_text_is_skipped_for_every_map_dataset_kind(tmp_path, caplog, make):
    entry, builder, good = make(tmp_path)
    loader = loader_for(entry, builder)
    with caplog.at_level(logging.WARNING):
        seen = draw(loader, 3 * len(good))
    assert set(seen) == good
    counts = loader.skip_counts()["data"]
    assert set(counts) == {"stray_image_marker"} and counts["stray_image_marker"] >= 2
    assert all("sample " in m and MARKER in m for m in skip_messages(caplog, "stray_image_marker"))


def tar_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_marker_in_a_stream_caption_is_skipped(tmp_path):
    """img2dataset captions are scraped web text; with a text processor that keeps case
    (here none), a literal marker survives into the sample."""
    shard = tar_shard(tmp_path / "00000.tar", {
        "000": {"jpg": jpeg_bytes(0, 16), "txt": b"a photo"},
        "001": {"jpg": jpeg_bytes(1, 16), "txt": f"alt text {MARKER}".encode()},
        "002": {"jpg": jpeg_bytes(2, 16), "txt": b"another photo"}})
    dataset = WebDatasetPairs([str(shard)], build_processor(VIS), None, shuffle_buffer=1)
    decoded, skipped = [], []
    for raw in dataset.raw_samples(0, 0, 0, 1):
        try:
            decoded.append(dataset.decode(raw, random.Random(0))["id"])
        except SkipSample as skip:
            skipped.append(skip)
    assert decoded == ["000", "002"]
    assert [s.reason for s in skipped] == ["stray_image_marker"] and "sample 001" in skipped[0].detail


def test_marker_counts_match_what_the_model_accepts():
    """check_sample_text passes exactly the samples the model's own check takes (and no marker in
    answers); a prompt template without the marker is `missing_image_marker`."""
    cases = [  # (prompt, answer, has_image, reason or None)
        (f"{IMAGE_PLACEHOLDER} what?", "x", True, None),
        ([f"{IMAGE_PLACEHOLDER} q1", "q2"], ["a1", "a2"], True, None),
        ("plain question", "x", False, None),
        (f"{IMAGE_PLACEHOLDER} what is {MARKER}?", "x", True, "stray_image_marker"),
        ([f"{IMAGE_PLACEHOLDER} q1", f"q2 {MARKER}"], ["a1", "a2"], True, "stray_image_marker"),
        (f"{IMAGE_PLACEHOLDER} what?", f"the {MARKER}", True, "stray_image_marker"),
        (f"say {MARKER}", "x", False, "stray_image_marker"),
        ("what is in the picture?", "x", True, "missing_image_marker"),
        ([f"{IMAGE_PLACEHOLDER} q1", "q2"], ["a1"], True, "bad_record"),
    ]
    for prompt, answer, has_image, reason in cases:
        turns = prompt if isinstance(prompt, list) else [prompt]
        answers = answer if isinstance(answer, list) else [answer]
        model_accepts = len(turns) == len(answers) and not any(MARKER in a for a in answers)
        try:
            TinyGPTV.check_markers([turns], has_images=has_image)
        except ValueError:
            model_accepts = False
        if reason is None:
            check_sample_text("k", prompt, answer, has_image)
            assert model_accepts
        else:
            with pytest.raises(SkipSample) as skip:
                check_sample_text("k", prompt, answer, has_image)
            assert skip.value.reason == reason and not model_accepts


# --- item 3: records that are not objects, bytes that are not UTF-8 --------------------------------

def _vqa_files(tmp_path: Path, records: list) -> tuple[dict, str, Path]:
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    return {"vis_processor": VIS, "ann_paths": [str(tmp_path / "vqa.json")], "image_root": str(tmp_path)}, \
        "coco_vqa", tmp_path / "vqa.json"


def _good_vqa(i: int) -> dict:
    return {"question_id": f"q{i}", "question": "what?", "answer": ["x"], "image": f"g{i}.jpg"}


@pytest.mark.parametrize("kind", ["vqa", "caption", "conversation", "text_only_json"])
def test_records_that_are_not_objects_are_skipped_naming_file_and_index(tmp_path, caplog, kind):
    write_images(tmp_path, ["g0", "g1"])
    if kind == "vqa":
        entry, builder, path = _vqa_files(tmp_path, [_good_vqa(0), *NOT_OBJECTS, _good_vqa(1)])
        good = {"q0", "q1"}
    elif kind == "caption":
        path = tmp_path / "filter_cap.json"
        records = [{"image_id": "g0", "caption": "red"}, *NOT_OBJECTS, {"image_id": "g1", "caption": "blue"}]
        path.write_text(json.dumps({"annotations": records}))
        entry, builder, good = {"vis_processor": VIS, "ann_path": str(path), "image_root": str(tmp_path)}, \
            "cc_sbu_align", {"g0", "g1"}
    elif kind == "conversation":
        path = tmp_path / "detail.json"
        turns = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "a shape"}]
        records = [{"id": "g0", "image": "g0.jpg", "conversations": turns}, *NOT_OBJECTS,
                   {"id": "g1", "image": "g1.jpg", "conversations": turns}]
        path.write_text(json.dumps(records))
        entry, builder, good = {"vis_processor": VIS, "ann_path": str(path), "image_root": str(tmp_path)}, \
            "llava_detail", {"g0", "g1"}
    else:
        path = tmp_path / "core_data.json"
        good_record = {"instruction": "x", "instances": [{"instruction_with_input": "hi", "output": "hello"}]}
        path.write_text(json.dumps([good_record, *NOT_OBJECTS, good_record]))
        entry, builder, good = {"ann_path": str(path)}, "unnatural_instruction", {"0", "5"}
    loader = loader_for(entry, builder)
    with caplog.at_level(logging.WARNING):
        seen = draw(loader, 3)  # 2 good among 6: the third is in epoch 1, so all of epoch 0 was drawn
    assert set(seen) == good
    counts = loader.skip_counts()["data"]
    assert set(counts) == {"bad_record"} and counts["bad_record"] >= 4
    messages = skip_messages(caplog, "bad_record")
    for index, kind_name in zip(range(1, 5), ["string", "number", "null", "list"]):
        assert any(f"{path} record {index}: a JSON {kind_name} where a record" in m for m in messages), messages


def test_a_first_record_that_is_not_an_object_is_a_start_up_error(tmp_path):
    entry, builder, path = _vqa_files(tmp_path, ["a string", _good_vqa(0)])
    with pytest.raises(ConfigError, match=rf"datasets\.data\.ann_paths\[0\]: {path}: record 0 is a JSON string"):
        loader_for(entry, builder)


def test_require_objects_names_file_and_index():
    """What start-up readers that build their own records (RefCOCO refs, Visual Genome) call."""
    require_objects([{"a": 1}, {}], "refs.json", "ann_root")
    for index, value, kind_name in [(1, "oops", "string"), (2, None, "null"), (1, [1], "list"), (0, 3.5, "number")]:
        items = [{"a": 1}, {}, {}]
        items[index] = value
        with pytest.raises(ConfigError, match=rf"^ann_root: refs\.json: ref {index} is a JSON {kind_name}, expected"):
            require_objects(items, "refs.json", "ann_root", what="ref")


def test_jsonl_lines_that_are_not_objects_or_not_utf8_are_skipped_naming_file_and_line(tmp_path, caplog):
    good = {"instruction": "x", "instances": [{"instruction_with_input": "hi", "output": "hello"}]}
    lines = [json.dumps(good).encode(), json.dumps("a string").encode(), b"7", b"null", b"[1, 2]",
             json.dumps({**good, "instances": [{"instruction_with_input": "caf\xe9", "output": "x"}]},
                        ensure_ascii=False).encode("latin-1"),
             json.dumps({**good, "instances": [{"instruction_with_input": "bye", "output": "ciao"}]}).encode()]
    path = tmp_path / "core_data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        loader = loader_for({"ann_path": str(path)}, "unnatural_instruction")
    assert sorted(next(loader)["answer"][0][0] for _ in range(2)) == ["ciao", "hello"]
    assert loader.skip_counts()["data"] == {"bad_record": 4, "malformed_json": 1}
    bad = skip_messages(caplog, "bad_record")
    for line, kind_name in zip(range(2, 6), ["string", "number", "null", "list"]):
        assert any(f"{path} line {line}: a JSON {kind_name}" in m for m in bad), bad
    (not_utf8,) = skip_messages(caplog, "malformed_json")
    offset = lines[5].index(b"\xe9")
    assert f"{path} line 6: not UTF-8 text: byte {offset} of the line is 0xe9" in not_utf8


@pytest.mark.parametrize("builder", ["coco_vqa", "cc_sbu_align", "unnatural_instruction"])
def test_a_json_file_that_is_not_utf8_is_one_error_naming_file_and_offset(tmp_path, builder):
    if builder == "coco_vqa":
        text = json.dumps([{**_good_vqa(0), "question": "caf\xe9?"}], ensure_ascii=False)
        entry = {"ann_paths": [str(tmp_path / "a.json")], "image_root": str(tmp_path)}
    elif builder == "cc_sbu_align":
        text = json.dumps({"annotations": [{"image_id": "g0", "caption": "caf\xe9"}]}, ensure_ascii=False)
        entry = {"ann_path": str(tmp_path / "a.json"), "image_root": str(tmp_path)}
    else:
        text = json.dumps([{"instruction": "x", "instances": [{"instruction_with_input": "caf\xe9", "output": "o"}]}],
                          ensure_ascii=False)
        entry = {"ann_path": str(tmp_path / "a.json")}
    data = text.encode("cp1252")  # what a spreadsheet export writes
    (tmp_path / "a.json").write_bytes(data)
    with pytest.raises(ConfigError) as error:
        loader_for(entry, builder)
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path / 'a.json'}: not UTF-8 text: byte {data.index(0xE9)} is 0xe9" in message


# --- item 12: messages name the shard and key, the file and record, the benchmark and sample --------

def test_shard_skips_name_the_shard_and_sample_key(tmp_path, caplog):
    # the good samples last: whatever the shard order, the third good one comes after every bad one
    members = {**{name: {"jpg": data, "txt": b"x"} for name, (data, _) in BAD_IMAGES.items()},
               "gif_only": {"gif": b"GIF89a", "txt": b"x"},
               "good": {"jpg": jpeg_bytes(0, 16), "txt": b"a photo"},
               "png_named_jpg": {"jpg": png_bytes(1), "txt": b"a png with a jpg name"}}  # content decides: used
    shard = tar_shard(tmp_path / "00000.tar", members)
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:  # one sample with its caption twice
        for name, data in (("dup.jpg", jpeg_bytes(3, 16)), ("dup.txt", b"first"), ("dup.txt", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry = {"vis_processor": VIS, "shuffle_buffer": 1, "shards": str(tmp_path / "{00000..00001}.tar")}
    loader = loader_for(entry, "laion")
    with caplog.at_level(logging.WARNING):
        seen = draw(loader, 3)
    assert sorted(seen) == ["dup", "good", "png_named_jpg"]
    for name, (_, reason) in BAD_IMAGES.items():
        messages = skip_messages(caplog, reason)
        assert any(m.endswith(f"): {shard}:{name}") or f"): {shard}:{name}: " in m for m in messages), messages
    (not_image,) = skip_messages(caplog, "unreadable_image")
    assert f"{shard}:not_an_image: cannot identify image file" in not_image and "<bytes>" not in not_image
    (incomplete,) = skip_messages(caplog, "incomplete_sample")
    assert f"{shard}:gif_only: no image member" in incomplete and "'gif'" in incomplete
    (duplicate,) = skip_messages(caplog, "duplicate_member")
    assert f"{tmp_path / '00001.tar'}: dup.txt: duplicate file name" in duplicate
    assert loader.skip_counts()["data"] == {"decompression_bomb": 1, "duplicate_member": 1, "empty_file": 1,
                                            "incomplete_sample": 1, "truncated_image": 2, "unreadable_image": 1}


def test_map_image_skips_name_the_file_and_record(tmp_path, caplog):
    write_images(tmp_path / "image", ["good"])
    (tmp_path / "image" / "png_named_jpg.jpg").write_bytes(png_bytes(2))
    for name, (data, _) in BAD_IMAGES.items():
        (tmp_path / "image" / f"{name}.jpg").write_bytes(data)
    ids = ["good", "png_named_jpg", *BAD_IMAGES]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": i, "caption": i} for i in ids]}))
    entry = {"vis_processor": VIS, "ann_path": str(tmp_path / "filter_cap.json"), "image_root": str(tmp_path / "image")}
    loader = loader_for(entry, "cc_sbu_align")
    with caplog.at_level(logging.WARNING):
        assert set(draw(loader, 3)) == {"good", "png_named_jpg"}  # the third good one is in epoch 1
    for index, (name, (_, reason)) in enumerate(BAD_IMAGES.items(), start=2):
        messages = skip_messages(caplog, reason)
        assert any(f"): record {index}: {tmp_path / 'image' / name}.jpg" in m for m in messages), messages


GQA = {"201": "a", "202": "b", "203": "c", "204": "d"}  # question id -> image id


def _gqa_settings(tmp_path: Path) -> EvalSettings:
    questions = {qid: {"imageId": image, "question": f"question {qid}?", "answer": "yes",
                       "types": {"structural": "verify"}} for qid, image in GQA.items()}
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    (tmp_path / "images").mkdir(exist_ok=True)
    for n, image in enumerate(GQA.values()):
        (tmp_path / "images" / f"{image}.jpg").write_bytes(jpeg_bytes(n, 16))
    benchmarks = {"gqa": {"name": "gqa", "questions": str(tmp_path / "gqa.json"),
                          "image_root": str(tmp_path / "images")}}
    return EvalSettings(benchmarks=benchmarks, output_dir=str(tmp_path / "out"), batch_size=2)


@pytest.mark.parametrize("bad", [*BAD_IMAGES, "missing"])
def test_a_bad_benchmark_image_names_benchmark_sample_and_file(tmp_path, bad):
    settings = _gqa_settings(tmp_path)
    image = tmp_path / "images" / "c.jpg"  # sample 203, in the second batch
    if bad == "missing":
        image.unlink()
    else:
        image.write_bytes(BAD_IMAGES[bad][0])
    reason = "missing_image" if bad == "missing" else BAD_IMAGES[bad][1]
    with pytest.raises(BadImageError) as error:
        evaluate(ScriptedModel({}), build_benchmarks(settings), settings, show_progress=False)
    assert isinstance(error.value, BenchmarkDataError)  # eval.py prints it as one line, exit 2
    message = str(error.value)
    assert message.startswith(f"benchmark gqa, sample 203: {reason.replace('_', ' ')}: {image}") and "\n" not in message
    # the first batch's predictions are kept: a rerun after fixing the file resumes from there
    rows = [json.loads(line) for line in (tmp_path / "out").glob("gqa*.jsonl").__next__().read_text().splitlines()]
    assert [r["id"] for r in rows] == ["201", "202"]


def test_a_benchmark_image_with_the_wrong_extension_is_read_by_its_content(tmp_path):
    (tmp_path / "x.jpg").write_bytes(png_bytes(3))
    transform = image_transform(16)
    assert torch.equal(load_image(str(tmp_path / "x.jpg"), transform), transform(Image.open(tmp_path / "x.jpg")))


# --- data health at the end of a run ------------------------------------------------------------------

def test_health_summary_counts_used_and_skipped_samples_and_survives_resume(tmp_path):
    entry, builder, _ = _caption_set(tmp_path)  # 2 good captions, 1 with a stray marker
    loader = loader_for(entry, builder)
    draw(loader, 4)
    (line,) = loader.health_summary()
    skipped = loader.skip_counts()["data"]["stray_image_marker"]
    assert line == f"data data: 4 samples used, {skipped} skipped (stray_image_marker {skipped})"
    resumed = loader_for(entry, builder)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.health_summary() == [line]
    draw(resumed, 2)
    assert resumed.health_summary()[0].startswith("data data: 6 samples used")
    fresh = loader_for(entry, builder)
    assert fresh.health_summary() == ["data data: 0 samples used, none skipped"]


def test_gqa_dict_layout_values_that_are_not_objects_are_skipped(tmp_path):
    """The official GQA layout {question id: record}: a bad value is a counted skip, as a bad
    record of the list layout is, not a TypeError at start-up."""
    write_images(tmp_path, ["g0", "g1"])
    questions = {"q0": {"question": "what?", "answer": "x", "image": "g0.jpg"}, "q1": "oops",
                 "q2": {"question": "what?", "answer": "y", "image": "g1.jpg"}}
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    loader = loader_for({"vis_processor": VIS, "ann_paths": [str(tmp_path / "gqa.json")],
                         "image_root": str(tmp_path)}, "gqa")
    assert set(draw(loader, 2)) == {"q0", "q2"}
    assert loader.skip_counts()["data"] == {"bad_record": 1}


@pytest.mark.parametrize("reader", ["refcoco_refs", "refcoco_instances", "vg_image_data", "vg_regions", "ocrvqa"])
def test_start_up_readers_name_the_file_of_an_entry_that_is_not_an_object(tmp_path, reader):
    ref = {"split": "train", "ann_id": 1, "image_id": 1, "sentences": [{"sent": "the left one"}]}
    instances = {"annotations": [{"id": 1, "bbox": [0, 0, 4, 4]}], "images": [{"id": 1, "width": 8, "height": 8}]}
    image = {"image_id": 1, "url": "http://x/VG_100K/1.jpg"}
    regions = [{"regions": [{"image_id": 1, "width": 2, "height": 2, "x": 0, "y": 0, "phrase": "dot"}]}]
    if reader.startswith("refcoco"):
        folder = tmp_path / "refcoco"
        folder.mkdir()
        refs = ["oops", ref] if reader == "refcoco_refs" else [ref]
        instances["annotations"] = instances["annotations"] if reader == "refcoco_refs" else [7]
        (folder / "refs(unc).json").write_text(json.dumps(refs))
        (folder / "instances.json").write_text(json.dumps(instances))
        entry, builder = {"ann_root": str(tmp_path), "image_root": str(tmp_path)}, "refcoco"
        bad = folder / ("refs(unc).json" if reader == "refcoco_refs" else "instances.json")
    elif reader.startswith("vg"):
        (tmp_path / "image_data.json").write_text(json.dumps([None] if reader == "vg_image_data" else [image]))
        (tmp_path / "region_descriptions.json").write_text(json.dumps(["x"] if reader == "vg_regions" else regions))
        entry, builder = {"data_root": str(tmp_path)}, "refvg"
        bad = tmp_path / ("image_data.json" if reader == "vg_image_data" else "region_descriptions.json")
    else:
        (tmp_path / "dataset.json").write_text(json.dumps({"b1": [1, 2]}))
        entry, builder = {"ann_path": str(tmp_path / "dataset.json"), "image_root": str(tmp_path)}, "ocrvqa"
        bad = tmp_path / "dataset.json"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: .*(is a JSON|is not an object)"):
        loader_for({"vis_processor": VIS, **entry}, builder)
