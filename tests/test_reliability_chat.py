"""Reliability of the chat and batch prediction (issue 13 item 11 and the chat half of item 4):
a decompression bomb is an error and the session goes on; a long conversation keeps its newest
turns (the question and its cue always reach the model); `--batch` skips and reports bad
requests, names a malformed line by file and line, and appends to / resumes its output.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_section
from PIL import Image

from tinygpt_v.chat import run_batch, run_terminal
from tinygpt_v.inference import (Chat, ImageError, InferenceSettings, PromptTooLong, prepare_model,
                                 read_inference_settings, read_requests)
from tinygpt_v.inference.conversation import prompt_length
from tinygpt_v.models import IMAGE_MARKER, build_model

GREEDY = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = build_model(tiny_model_section(end_sym="###"), verbose=False)
    return prepare_model(built, InferenceSettings(device="cpu"))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A 70-byte PNG whose header claims width x height pixels: what a decompression bomb looks
    like before decoding (decoding it would need width*height*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def good_image(path: Path, colour=(200, 40, 40)) -> Path:
    Image.new("RGB", (48, 40), colour).save(path)
    return path


# --- item 11: a decompression bomb --------------------------------------------------------------------

@pytest.mark.parametrize("width, height, max_pixels", [
    (30_000, 30_000, None),       # over PIL's own hard limit (2 x 89M pixels), whatever ours is
    (10_000, 10_000, 89_478_485),  # over the configured limit (inference.max_image_pixels)
])
def test_a_decompression_bomb_is_an_error_naming_the_file(model, tmp_path, width, height, max_pixels):
    bomb = png_header_only(tmp_path / "bomb.png", width, height)
    session = Chat(model, "stage1-3", GREEDY, max_image_pixels=max_pixels)
    with pytest.raises(ImageError) as error:
        session.upload_image(bomb)
    assert str(bomb) in str(error.value) and "decompression bomb" in str(error.value)


def test_the_terminal_session_goes_on_after_a_bomb_and_keeps_its_conversation(model, tmp_path):
    picture = good_image(tmp_path / "ok.png")
    bomb = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)
    session = Chat(model, "stage1-3", GREEDY)
    out = io.StringIO()
    run_terminal(session, [f"/image {picture}", "What colour?", f"/image {bomb}", "And now?"], out)
    text = out.getvalue()
    assert f"cannot read image '{bomb}'" in text and "decompression bomb" in text
    assert text.count("Assistant: ") == 2  # both questions answered
    assert session.pixels is not None and session.questions == ["What colour?", "And now?"]


# --- item 4 (chat): a long conversation keeps the newest turns -----------------------------------------

def test_a_long_conversation_keeps_the_newest_turns_the_question_and_its_cue(model, tmp_path, monkeypatch):
    session = Chat(model, "stage1-3", GREEDY)
    session.upload_image(good_image(tmp_path / "ok.png"))
    for n in range(6):
        session.questions.append(f"old question number {n} about the shapes in the picture")
        session.answers.append(f"a long answer number {n} about colours and sizes and places")
    question = "Which shape is red?"
    # a context that holds the image, the two newest turns and the question, with a little to spare
    newest_two = session.template.render(session.questions[4:] + [question], session.answers[4:], with_image=True)
    limit = prompt_length(model, newest_two, session.image_tokens) + 3
    monkeypatch.setattr(model, "max_context_len", limit)
    prompt = session.prompt_for(question)
    assert prompt == newest_two and session.dropped_turns == 4
    assert prompt.endswith("###Human: Which shape is red? ###Assistant: ")  # the question and the cue
    assert prompt.count(IMAGE_MARKER) == 1 and prompt.startswith("###Human: <Img><ImageHere></Img> old question "
                                                                 "number 4")  # the image moved to the first kept turn
    # the model gets all of it: nothing is cut from the end by the context limit
    sequence = model.build_sequence([prompt], None, session.image_tokens, apply_template=False)
    assert len(sequence.ids) == prompt_length(model, prompt, session.image_tokens) <= limit
    # before: the whole history went in and the limit cut its end, question and cue included
    whole = session.template.render(session.questions + [question], session.answers, with_image=True)
    assert prompt_length(model, whole, session.image_tokens) > limit
    # the conversation itself is kept whole (the user can scroll back)
    assert len(session.history) == 6
    out = io.StringIO()
    run_terminal(session, [question], out)
    assert "the oldest 4 turn(s) no longer fit" in out.getvalue()


def test_a_question_too_long_alone_is_refused_and_the_session_goes_on(model, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "max_context_len", 30)
    session = Chat(model, "stage1-3", GREEDY)
    session.upload_image(good_image(tmp_path / "ok.png"))
    with pytest.raises(PromptTooLong, match="model.max_context_len 30"):
        session.prompt_for("why " * 40)
    out = io.StringIO()
    run_terminal(session, ["why " * 40, "Red?"], out)
    assert "cannot ask that: the question is too long" in out.getvalue()
    assert session.questions == ["Red?"]


def test_a_question_holding_the_image_marker_is_refused_not_crashing(model):
    out = io.StringIO()
    session = Chat(model, "stage1-3", GREEDY)
    run_terminal(session, [f"what is {IMAGE_MARKER}?", "hi"], out)
    assert "cannot ask that" in out.getvalue() and session.questions == ["hi"]


# --- item 11: --batch skips, reports, appends and resumes ---------------------------------------------------

@pytest.fixture
def settings():
    return read_inference_settings({"template": "stage1-3", "device": "cpu", "generation": GREEDY})


def write_requests(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def answers_in(path: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in map(json.loads, path.read_text().splitlines())}


def test_batch_skips_and_reports_bad_requests_and_answers_the_rest(model, settings, tmp_path):
    good_image(tmp_path / "a.png")
    good_image(tmp_path / "b.png", (20, 200, 20))
    png_header_only(tmp_path / "bomb.png", 30_000, 30_000)
    requests = write_requests(tmp_path / "q.jsonl", [
        {"id": "a", "image": "a.png", "question": "colour?"},
        '{"id": "broken", "image": "a.png", "question": ',           # line 2: malformed
        {"id": "noq", "image": "a.png"},                               # line 3: no question
        {"id": "bomb", "image": "bomb.png", "question": "colour?"},    # a decompression bomb
        {"id": "gone", "image": "missing.png", "question": "colour?"},  # no such file
        {"id": "b", "image": "b.png", "question": "colour?"},
        {"id": "a", "image": "b.png", "question": "again?"},           # line 7: repeated id
        ["not", "an", "object"],                                       # line 8
    ])
    output, err = tmp_path / "answers.jsonl", io.StringIO()
    status = run_batch(model, settings, str(requests), None, str(output), batch_size=4, err=err)
    assert status == 1
    assert set(answers_in(output)) == {"a", "b"}
    report = err.getvalue().splitlines()
    assert len(report) == 6 and all(line.startswith("skipped ") for line in report)
    text = err.getvalue()
    assert f"{requests}:2: not a JSON line" in text and f"{requests}:3:" in text
    assert f"{requests}:7: id 'a' repeats line 1" in text and f"{requests}:8: expected an object" in text
    assert "request bomb:" in text and "decompression bomb" in text and "request gone:" in text


def test_batch_appends_and_resumes_instead_of_overwriting(model, settings, tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        good_image(tmp_path / f"{name}.png")
    lines = [{"id": name, "image": f"{name}.png", "question": "colour?"} for name in ("a", "b")]
    requests = write_requests(tmp_path / "q.jsonl", lines)
    output = tmp_path / "answers.jsonl"
    assert run_batch(model, settings, str(requests), None, str(output), batch_size=8, err=io.StringIO()) == 0
    first = answers_in(output)
    # a third request; and the run that wrote "b" was killed mid-line
    write_requests(requests, lines + [{"id": "c", "image": "c.png", "question": "colour?"}])
    output.write_text(output.read_text()[:-7])
    asked = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda pixels, prompts, **kw: asked.extend(prompts) or
                        generate(pixels, prompts, **kw))
    assert run_batch(model, settings, str(requests), None, str(output), batch_size=8, err=io.StringIO()) == 0
    assert len(asked) == 2  # b (torn) and c; a was kept
    again = answers_in(output)
    assert set(again) == {"a", "b", "c"} and again["a"] == first["a"] and again["b"] == first["b"]
    assert len(output.read_text().splitlines()) == 3


def test_a_malformed_line_without_an_error_list_names_file_and_line(tmp_path):
    requests = write_requests(tmp_path / "q.jsonl", [{"image": "a.png", "question": "q"}, "{oops"])
    with pytest.raises(ValueError, match=rf"{requests}:2: not a JSON line"):
        read_requests(requests)
