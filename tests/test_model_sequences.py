"""The text/image splice and the loss mask of TinyGPTV.forward (REFERENCE.md, 'Forward and loss')."""
from __future__ import annotations

import pytest
import torch

from tinygpt_v.models import IMAGE_MARKER
from tinygpt_v.models.tinygpt_v import IGNORE

IMG_PROMPT = "<Img><ImageHere></Img> What colour is the circle?"


def tok(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def images(n, size=112, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_single_turn_layout_and_labels(tiny_model):
    m = tiny_model
    n_img = m.qformer.query_tokens.shape[1]
    bos, pad = m.tokenizer.bos_token_id, m.tokenizer.pad_token_id
    _, mask, labels = m.prepare_training_inputs(images(1), [[IMG_PROMPT]], [["red"]])

    before, after = tok(m, "<Img>"), tok(m, "</Img> What colour is the circle?")
    answer = tok(m, "red\n")
    expected_labels = [IGNORE] * (1 + len(before) + n_img + len(after)) + answer
    assert labels[0].tolist() == expected_labels
    assert mask[0].tolist() == [1] * len(expected_labels)
    seq = m.build_sequence([IMG_PROMPT], ["red"], n_img)
    assert seq.ids == [bos] + before + [pad] * n_img + after + answer
    assert seq.is_image == [False] * (1 + len(before)) + [True] * n_img + [False] * (len(after) + len(answer))


def test_image_embeddings_sit_exactly_at_the_marker(tiny_model):
    m = tiny_model.eval()
    pixels = images(2)
    prompts = [[IMG_PROMPT], ["<Img><ImageHere></Img>"]]
    embeds, _, _ = m.prepare_training_inputs(pixels, prompts, [["red"], ["a blue square"]])
    image_embeds = m.encode_image(pixels)
    n_img = image_embeds.shape[1]
    for i, turns in enumerate(prompts):
        start = 1 + len(tok(m, turns[0].split(IMAGE_MARKER)[0]))
        assert torch.equal(embeds[i, start:start + n_img], image_embeds[i])
        # the token just before and just after the image are text embeddings, not image rows
        text_embed = m.llm.get_input_embeddings().weight
        assert torch.equal(embeds[i, start - 1], text_embed[tok(m, "<Img>")[-1]])
        assert torch.equal(embeds[i, start + n_img], text_embed[tok(m, turns[0].split(IMAGE_MARKER)[1])[0]])


def test_template_wraps_every_turn_and_later_turns_start_with_masked_bos(tiny_model):
    m = tiny_model
    m.prompt_template, m.end_sym = "###Human: {} ###Assistant: ", "###"
    n_img = m.qformer.query_tokens.shape[1]
    seq = m.build_sequence([IMG_PROMPT, "And the square?"], ["Red.", "Blue."], n_img)
    bos = m.tokenizer.bos_token_id
    turn1 = [bos] + tok(m, "###Human: <Img>") + [m.tokenizer.pad_token_id] * n_img \
        + tok(m, "</Img> What colour is the circle? ###Assistant: ")
    answer1 = tok(m, "Red.###")
    turn2 = [bos] + tok(m, "###Human: And the square? ###Assistant: ")
    answer2 = tok(m, "Blue.###")
    assert seq.ids == turn1 + answer1 + turn2 + answer2
    assert seq.labels == [IGNORE] * len(turn1) + answer1 + [IGNORE] * len(turn2) + answer2
    # the original's conversation mask is `ids != pad`, and Phi-2's pad is its BOS: the later
    # BOS is not attended to; the first one (and the image slots) are
    expected_mask = [1] * len(turn1 + answer1) + [0] + [1] * (len(turn2) - 1 + len(answer2))
    assert seq.mask == expected_mask


def test_conversation_is_cut_at_max_txt_len_over_all_regressed_turns(tiny_model):
    m = tiny_model
    n_img = m.qformer.query_tokens.shape[1]
    full = m.build_sequence([IMG_PROMPT, "And the square?", "And the star?"], ["Red.", "Blue.", "Green."], n_img)
    prompt_len = 1 + len(m._prompt_part(IMG_PROMPT, n_img).ids)
    m.max_txt_len = 7  # cuts inside the second question: answer 1 stays whole, nothing of turn 3
    seq = m.build_sequence([IMG_PROMPT, "And the square?", "And the star?"], ["Red.", "Blue.", "Green."], n_img)
    assert len(seq.ids) == prompt_len + 7
    assert seq.ids == full.ids[:prompt_len + 7] and seq.labels == full.labels[:prompt_len + 7]
    assert seq.mask == full.mask[:prompt_len + 7]


def test_answers_are_cut_at_max_txt_len_and_prompts_at_max_context_len(tiny_model):
    m = tiny_model
    n_img = m.qformer.query_tokens.shape[1]
    long_answer = " ".join(["circle"] * 100)
    m.max_txt_len = 5
    seq = m.build_sequence([IMG_PROMPT], [long_answer], n_img)
    assert [t for t in seq.labels if t != IGNORE] == tok(m, long_answer + "\n")[:5]
    assert not seq.prompt_truncated


def test_a_prompt_longer_than_max_context_len_keeps_its_answer(tiny_model):
    """Issue 13 item 4: the original caps the prompt part, never the answer; a sample whose
    prompt is too long still trains on its answer (no loss of exactly 0.0)."""
    m = tiny_model.eval()
    n_img = m.qformer.query_tokens.shape[1]
    long_prompt = IMG_PROMPT + " " + " ".join(["square"] * 300)
    m.max_context_len = 20
    seq = m.build_sequence([long_prompt], ["red"], n_img)
    answer = tok(m, "red\n")
    assert seq.prompt_truncated
    assert len(seq.ids) == 1 + 20 + len(answer)
    assert seq.ids[-len(answer):] == answer and seq.labels[-len(answer):] == answer
    assert seq.ids[:21] == m.build_sequence([long_prompt], ["red"], n_img).ids[:21]
    m.num_truncated_prompts = 0
    out = m({"image": images(1), "prompt": [[long_prompt]], "answer": [["red"]]})
    assert out["num_target_tokens"] == len(answer) and out["loss"].item() > 0
    assert m.num_truncated_prompts == 1


def test_right_padding_never_contributes_to_the_loss(tiny_model):
    """Batch loss == token-weighted mean of the per-sample losses computed alone."""
    m = tiny_model.eval()
    pixels = images(2)
    samples = [([IMG_PROMPT], ["red"]), (["<Img><ImageHere></Img> Describe the picture in detail please."],
                                         ["there is a big blue square on the left and a red circle"])]
    batch = {"image": pixels, "prompt": [s[0] for s in samples], "answer": [s[1] for s in samples]}
    together = m(batch)
    alone = [m({"image": pixels[i:i + 1], "prompt": [p], "answer": [a]}) for i, (p, a) in enumerate(samples)]
    _, mask, labels = m.prepare_training_inputs(pixels, batch["prompt"], batch["answer"])
    assert mask[0].sum() < mask.shape[1] and (labels[0][mask[0] == 0] == IGNORE).all()  # sample 0 is padded
    weighted = sum(o["loss"] * o["num_target_tokens"] for o in alone) / together["num_target_tokens"]
    assert together["num_target_tokens"] == sum(o["num_target_tokens"] for o in alone)
    torch.testing.assert_close(together["loss"], weighted, rtol=1e-5, atol=1e-5)


def test_loss_is_cross_entropy_on_answer_tokens_only(tiny_model):
    m = tiny_model.eval()
    pixels = images(1)
    out = m({"image": pixels, "prompt": [[IMG_PROMPT]], "answer": [["red"]]})
    embeds, mask, labels = m.prepare_training_inputs(pixels, [[IMG_PROMPT]], [["red"]])
    logits = m.llm(inputs_embeds=embeds, attention_mask=mask).logits[0]
    answer = tok(m, "red\n")
    first = labels.shape[1] - len(answer)  # answer tokens are the last ones, predicted one step earlier
    logprobs = logits.log_softmax(-1)
    manual = -sum(logprobs[first - 1 + k, t] for k, t in enumerate(answer)) / len(answer)
    torch.testing.assert_close(out["loss"], manual, rtol=1e-5, atol=1e-6)


def test_text_only_batch_and_marker_checks(tiny_model):
    m = tiny_model
    out = m({"image": None, "prompt": [["Give me three colours."]], "answer": [["red, green, blue"]]})
    assert out["num_target_tokens"] == len(tok(m, "red, green, blue\n"))
    with pytest.raises(ValueError, match="sample 0: prompt has 0"):
        m({"image": images(1), "prompt": [["no marker here"]], "answer": [["x"]]})
    with pytest.raises(ValueError, match="sample 0: prompt has 1"):
        m({"image": None, "prompt": [[IMG_PROMPT]], "answer": [["x"]]})
    with pytest.raises(ValueError, match="has 2"):
        m({"image": images(1), "prompt": [[IMG_PROMPT, IMG_PROMPT]], "answer": [["x", "y"]]})


def test_stage1_sequence_is_bos_image_caption_and_img_tags_are_a_template_switch(tiny_model):
    """The original's stages 1-2: [BOS] image caption end_sym, no <Img> text (our caption pairs
    give the prompt "<ImageHere>"); `prompt_template: "<Img>{}</Img>"` puts the tags back."""
    m = tiny_model
    n_img = m.qformer.query_tokens.shape[1]
    bos, pad = m.tokenizer.bos_token_id, m.tokenizer.pad_token_id
    seq = m.build_sequence(["<ImageHere>"], ["a red circle"], n_img)
    assert seq.ids == [bos] + [pad] * n_img + tok(m, "a red circle\n")
    m.prompt_template = "<Img>{}</Img>"
    seq = m.build_sequence(["<ImageHere>"], ["a red circle"], n_img)
    assert seq.ids == [bos] + tok(m, "<Img>") + [pad] * n_img + tok(m, "</Img>") + tok(m, "a red circle\n")


def test_generation_prompt_can_leave_out_bos_as_the_originals_generate(tiny_model):
    m = tiny_model
    n_img = m.qformer.query_tokens.shape[1]
    with_bos = m.build_sequence([IMG_PROMPT], None, n_img)
    without = m.build_sequence([IMG_PROMPT], None, n_img, add_bos=False)
    assert with_bos.ids == [m.tokenizer.bos_token_id] + without.ids
    assert without.labels == [IGNORE] * len(without.ids) and without.mask == [1] * len(without.ids)


def test_original_protocol_generates_from_a_prompt_without_bos(tiny_model):
    """The runner's original-protocol settings reach `generate`, which then hands the LLM one
    position fewer (no BOS) than our protocol does, for the same prompt."""
    from tinygpt_v.evaluation.runner import Generation
    m = tiny_model.eval()
    seen = []

    def capture(**kwargs):
        seen.append(kwargs["inputs_embeds"].shape[1])
        return torch.zeros((1, 1), dtype=torch.long)

    m.llm.generate = capture
    prompt = "###Human: <Img><ImageHere></Img> what?###Assistant: "
    original = Generation(1, 5, 1, 112, original=True).generate_kwargs()
    ours = Generation(1, 5, 1, 112).generate_kwargs()
    m.generate(images(1), [prompt], **original)
    m.generate(images(1), [prompt], **{**ours, "apply_template": False})
    assert original["add_bos"] is False and seen[1] == seen[0] + 1


def test_original_candidate_ranking_is_minus_the_training_loss(tiny_model):
    """The original's `multi_select` ranks each candidate by `forward`'s loss with its eval model
    settings (no chat template, end_sym "\\n"). Our forward is checked against the original's
    by the fidelity fixtures; here the original-protocol score must be exactly minus that loss."""
    from tinygpt_v.evaluation.original import ORIGINAL_SCORING
    m = tiny_model.eval()
    prompt = "###Human: <Img><ImageHere></Img> which one? ###Assistant: "
    candidates = ["red", "a blue square"]
    m.prompt_template, m.end_sym = "[INST] {} [/INST]", "###"  # a stage-4 model: must not matter
    scores = m.score_candidates(images(1), [prompt], [candidates], **ORIGINAL_SCORING)[0]
    m.prompt_template, m.end_sym = "{}", "\n"
    with torch.no_grad():
        losses = [m({"image": images(1), "prompt": [[prompt]], "answer": [[c]]})["loss"].item() for c in candidates]
    assert scores == pytest.approx([-loss for loss in losses], rel=1e-5)
    assert scores != pytest.approx(m.score_candidates(images(1), [prompt], [candidates])[0])
