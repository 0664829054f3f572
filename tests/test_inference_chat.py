"""Chat, templates, streaming, batch prediction and the terminal loop, on the tiny model."""
from __future__ import annotations

import io
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, tiny_model_section
from tinygpt_v.inference import (Chat, GenerationSettings, InferenceSettings, chat, load_model, predict,
                                 prepare_model, read_inference_settings, read_requests, stream_generate)
from tinygpt_v.inference.streaming import _hold_back_partial_stop
from tinygpt_v.models import build_model
from tinygpt_v.registry import ConfigError

GREEDY = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = build_model(tiny_model_section(end_sym="###"), verbose=False)
    return prepare_model(built, InferenceSettings(device="cpu"))


@pytest.fixture
def pixels():
    return torch.randn(3, 112, 112, generator=torch.Generator().manual_seed(1))


def tok(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


class Recorder:
    """Wraps a callable, keeping the arguments of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def always_say(model, word: str) -> None:
    """Make the LLM's greedy choice always `word` (one token): zero lm_head, one-hot bias."""
    (token,) = tok(model, word)
    head = model.llm.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token] = 10.0


# --- templates: what the LLM is given ------------------------------------------------------------

def test_three_turn_stage1_3_prompt_is_the_template_text_with_the_image_spliced_once(model, pixels, monkeypatch):
    generate = Recorder(model.generate)
    llm_generate = Recorder(model.llm.generate)
    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(model.llm, "generate", llm_generate)
    session = Chat(model, "stage1-3", GREEDY)
    session.upload_image(pixels)
    a1 = session.ask("What colour is the circle?")
    a2 = session.ask("And the square?")
    session.ask("Where is it?")

    expected = ("###Human: <Img><ImageHere></Img> What colour is the circle? ###Assistant: "
                f"{a1}###Human: And the square? ###Assistant: "
                f"{a2}###Human: Where is it? ###Assistant: ")
    (_, prompts), kwargs = generate.calls[-1]
    assert prompts == [expected] and kwargs["apply_template"] is False

    # the LLM's input: BOS, the text up to <ImageHere>, the image once, then all the rest as text
    n_image = model.qformer.query_tokens.shape[1]
    before, after = tok(model, "###Human: <Img>"), tok(model, expected.split("<ImageHere>")[1])
    ids = [model.tokenizer.bos_token_id] + before + after
    embeds = llm_generate.calls[-1][1]["inputs_embeds"][0]
    assert embeds.shape[0] == len(ids) + n_image
    table = model.llm.get_input_embeddings().weight
    image_rows = slice(1 + len(before), 1 + len(before) + n_image)
    text_rows = torch.cat([embeds[:image_rows.start], embeds[image_rows.stop:]])
    assert torch.equal(text_rows, table[ids])
    torch.testing.assert_close(embeds[image_rows], model.encode_image(pixels[None])[0])


def test_stage4_template_closes_each_past_answer_with_end_sym(model, pixels):
    session = Chat(model, "stage4", GREEDY)
    session.upload_image(pixels)
    a1 = session.ask("[vqa] what shape is red?")
    assert session.prompt_for("and blue?") == (
        f"[INST] <Img><ImageHere></Img> [vqa] what shape is red? [/INST] {a1}###[INST] and blue? [/INST] ")


def test_without_an_image_no_image_marker_is_sent(model):
    session = Chat(model, "stage1-3", GREEDY)
    session.ask("hello")
    assert session.prompt_for("again") == f"###Human: hello ###Assistant: {session.answers[0]}###Human: again ###Assistant: "


def test_a_custom_template_from_config_and_unknown_presets_are_refused(model):
    session = Chat(model, {"turn": "Instruct: {} /n Output: ", "after_answer": "###"}, GREEDY)
    assert session.prompt_for("hi") == "Instruct: hi /n Output: "
    with pytest.raises(ConfigError, match="inference.template.*unknown template 'stage5'"):
        Chat(model, "stage5")


def test_new_image_and_reset_start_a_new_conversation(model, pixels):
    session = Chat(model, "stage1-3", GREEDY)
    session.upload_image(pixels)
    session.ask("What colour?")
    session.upload_image(pixels * 0)
    assert session.history == [] and session.prompt_for("q") == "###Human: <Img><ImageHere></Img> q ###Assistant: "
    session.ask("What colour?")
    session.reset()
    assert session.history == [] and session.pixels is None


def test_one_shot_chat_equals_the_first_turn_of_a_chat(model, pixels):
    session = Chat(model, "stage4", GREEDY)
    session.upload_image(pixels)
    assert chat(model, pixels, "what is this?", template="stage4", **GREEDY) == session.ask("what is this?")


# --- streaming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("question", ["What colour is the circle?", "how many shapes", "describe this image"])
def test_streaming_ends_with_the_non_streaming_greedy_answer(model, pixels, question):
    prompt = f"###Human: <Img><ImageHere></Img> {question} ###Assistant: "
    expected = model.generate(pixels[None], [prompt], apply_template=False, max_new_tokens=16)[0]
    snapshots = list(stream_generate(model, pixels[None], prompt, apply_template=False, max_new_tokens=16))
    assert snapshots[-1] == expected
    assert all(expected.startswith(s) for s in snapshots)


def test_streaming_yields_growing_answers_word_by_word(pixels):
    torch.manual_seed(0)
    m = prepare_model(build_model(tiny_model_section(end_sym="###"), verbose=False), InferenceSettings(device="cpu"))
    always_say(m, " circle")
    session = Chat(m, "stage1-3", {"max_new_tokens": 4})
    session.upload_image(pixels)
    snapshots = list(session.ask_stream("What shape?"))
    assert snapshots[-1] == "circle circle circle circle"
    assert len(snapshots) >= 3  # pieces arrive while generating, not all at the end
    assert session.answers == ["circle circle circle circle"]


def test_a_partial_end_sym_is_held_back_until_it_is_decided():
    assert _hold_back_partial_stop("red ##", "###") == "red "
    assert _hold_back_partial_stop("red #a", "###") == "red #a"
    assert _hold_back_partial_stop("red ### blue", "###") == "red ### blue"  # clean_answer cuts it


def test_beam_search_is_answered_in_one_piece(model, pixels):
    prompt = "###Human: <Img><ImageHere></Img> What colour? ###Assistant: "
    expected = model.generate(pixels[None], [prompt], apply_template=False, max_new_tokens=8, num_beams=2)[0]
    assert list(stream_generate(model, pixels[None], prompt, apply_template=False, max_new_tokens=8,
                                num_beams=2)) == [expected]


def test_temperature_zero_is_greedy_and_above_zero_samples():
    assert GenerationSettings(temperature=0.0).generate_kwargs()["do_sample"] is False
    sampling = GenerationSettings(temperature=0.7).generate_kwargs()
    assert sampling["do_sample"] is True and sampling["temperature"] == 0.7
    assert GenerationSettings(num_beams=2).replace(num_beams=None, max_new_tokens=5).num_beams == 2


# --- batch prediction ----------------------------------------------------------------------------

def write_images(folder, count: int) -> list:
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (40 + 10 * i, 30), (50 * i, 100, 200 - 40 * i)).save(path)
        paths.append(path)
    return paths


def test_batch_prediction_over_a_folder_matches_one_question_at_a_time(model, tmp_path):
    paths = write_images(tmp_path, 3)
    requests = read_requests(tmp_path, question="What colour is it?")
    results = list(predict(model, requests, "stage4", GenerationSettings(max_new_tokens=8), batch_size=2))
    assert [r["id"] for r in results] == ["img0.png", "img1.png", "img2.png"]
    for path, result in zip(paths, results):
        assert result["answer"] == chat(model, str(path), "What colour is it?", template="stage4", max_new_tokens=8)


def test_jsonl_requests_read_images_next_to_the_file(tmp_path):
    write_images(tmp_path, 2)
    lines = [{"image": "img0.png", "question": "q0", "id": "a"}, {"image": str(tmp_path / "img1.png"), "question": "q1"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    requests = read_requests(tmp_path / "q.jsonl")
    assert [(r.id, r.image, r.question) for r in requests] == [
        ("a", str(tmp_path / "img0.png"), "q0"), ("2", str(tmp_path / "img1.png"), "q1")]
    with pytest.raises(ValueError, match="give the question"):
        read_requests(tmp_path)


# --- terminal chat and configs -------------------------------------------------------------------

def test_terminal_chat_loads_images_answers_resets_and_quits(model, tmp_path):
    from tinygpt_v.chat import run_terminal
    (image,) = write_images(tmp_path, 1)
    session = Chat(model, "stage1-3", GREEDY)
    out = io.StringIO()
    run_terminal(session, [f"/image {image}", "What colour?", "/image /no/such.png", "/reset", "Hi", "/quit",
                           "never read"], out)
    text = out.getvalue()
    assert f"(new conversation about {image})" in text and "cannot read image '/no/such.png'" in text
    assert "(conversation reset; the image stays)" in text  # issue 20: /reset keeps the image
    assert session.questions == ["Hi"] and session.pixels is not None
    assert text.count("Assistant: ") == 2


def test_chat_config_loads_the_tiny_model_with_its_template(tmp_path):
    from tinygpt_v.chat import load_chat_config
    model, settings = load_chat_config(str(REPO / "eval_configs/chat_tiny.yaml"),
                                       ["inference.generation.max_new_tokens=3"])
    assert settings.template == "stage1-3" and settings.generation_settings.max_new_tokens == 3
    assert model.end_sym == "###" and not model.training


@pytest.mark.parametrize("name, template", [("chat_stage3", "stage1-3"), ("chat_stage4", "stage4")])
def test_shipped_chat_configs_have_valid_inference_sections(name, template):
    section = OmegaConf.load(REPO / f"eval_configs/{name}.yaml").inference
    assert read_inference_settings(section).template == template


def test_bad_inference_settings_name_the_key():
    with pytest.raises(ConfigError, match="inference.quantization"):
        read_inference_settings({"quantization": "int4"})
    with pytest.raises(ConfigError, match="inference.generation.beams"):
        read_inference_settings({"generation": {"beams": 2}})


def test_load_model_reads_an_exported_folder(model, tmp_path, pixels):
    section = tiny_model_section(end_sym="###")
    torch.manual_seed(0)  # the same weights as the `model` fixture
    build_model(section, verbose=False).save_pretrained(tmp_path, model_config=section)
    torch.manual_seed(123)  # a different random init, overwritten by the folder's weights
    loaded = load_model(str(tmp_path), InferenceSettings(device="cpu"))
    assert chat(loaded, pixels, "what?", **GREEDY) == chat(model, pixels, "what?", **GREEDY)
