"""Low-memory modes on the tiny model: int8 / nf4 LLM (bitsandbytes), bf16, vision on the CPU.

Tolerances (measured on this tiny random model, CPU, bitsandbytes 0.50: int8 0.015, nf4 0.20):
the largest logit deviation from fp32 over the fp32 greedy answer, relative to the largest
fp32 logit, stays within 5% for int8 and 35% for nf4; int8 also keeps the first half of the
greedy answer (later tokens of a random model are near-ties).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_model_section
from tinygpt_v.inference import InferenceSettings, prepare_model
from tinygpt_v.models import build_model

PROMPT = "###Human: <Img><ImageHere></Img> What colour is the circle? ###Assistant: "
TOLERANCE = {"int8": 0.05, "nf4": 0.35}


def fresh_model(settings: InferenceSettings):
    torch.manual_seed(0)
    return prepare_model(build_model(tiny_model_section(end_sym="###"), verbose=False), settings)


def answer_logits(model, pixels, answer: str) -> torch.Tensor:
    """The LLM's logits at each position that predicts a token of `answer` (teacher forced)."""
    embeds, mask, labels = model.prepare_training_inputs(pixels, [[PROMPT]], [[answer]], add_end_sym=False)
    with torch.no_grad():
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()
    return logits[0, :-1][labels[0, 1:] != -100]


def quantized_or_skip(mode: str):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    try:
        return fresh_model(InferenceSettings(device="cpu", quantization=mode))
    except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot run {mode} on this CPU: {e}")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def reference(pixels):
    model = fresh_model(InferenceSettings(device="cpu"))
    answer = model.generate(pixels, [PROMPT], apply_template=False, max_new_tokens=12)[0]
    assert answer, "the reference needs a non-empty greedy answer to compare logits on"
    return answer, answer_logits(model, pixels, answer)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_llm_logits_stay_close_to_fp32(mode, pixels, reference):
    answer, fp32_logits = reference
    model = quantized_or_skip(mode)
    linear = model.llm.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[mode]
    # TinyGPT-V's post-attention norms survive quantisation, in fp32
    assert model.llm.model.layers[0].post_layernorm.weight.dtype == torch.float32
    deviation = (answer_logits(model, pixels, answer) - fp32_logits).abs().max() / fp32_logits.abs().max()
    assert deviation <= TOLERANCE[mode], f"{mode}: relative logit deviation {deviation:.3f}"
    if mode == "int8":
        # a random tiny model has near-ties late in the answer, where int8 rounding may pick the
        # other token; a broken quantisation diverges from the first tokens on
        int8_answer = model.generate(pixels, [PROMPT], apply_template=False, max_new_tokens=12)[0]
        assert len(os.path.commonprefix([int8_answer, answer])) >= len(answer) // 2, (int8_answer, answer)


def test_quantizing_keeps_trained_post_norm_weights(pixels):
    torch.manual_seed(0)
    model = build_model(tiny_model_section(end_sym="###"), verbose=False)
    norm = model.llm.base_model.model.model.layers[1].post_layernorm
    with torch.no_grad():
        norm.weight.fill_(0.5)
    pytest.importorskip("bitsandbytes")
    try:
        model = prepare_model(model, InferenceSettings(device="cpu", quantization="int8"))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes cannot run int8 on this CPU: {e}")
    assert torch.equal(model.llm.model.layers[1].post_layernorm.weight, torch.full((64,), 0.5))


def test_bf16_llm_with_a_bf16_vision_tower_on_cpu(pixels, reference):
    model = fresh_model(InferenceSettings(device="cpu", precision="bf16", vision_precision="bf16"))
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.vision.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # matmul weights only
    assert model.vision.model.pos_embed.dtype == torch.float32
    # the small middle parts stay fp32: encode_image runs them in fp32
    assert model.qformer.query_tokens.dtype == model.connector.llama_proj.weight.dtype == torch.float32
    assert not hasattr(model.llm, "peft_config")  # LoRA merged for inference
    answer, fp32_logits = reference
    deviation = (answer_logits(model, pixels, answer) - fp32_logits).abs().max() / fp32_logits.abs().max()
    assert deviation <= 0.1


def test_merging_lora_keeps_the_answers(pixels):
    def with_trained_lora(merge: bool):
        torch.manual_seed(0)
        model = build_model(tiny_model_section(end_sym="###"), verbose=False)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():  # peft starts lora_B at zero, where merging changes nothing
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        return prepare_model(model, InferenceSettings(device="cpu", merge_lora=merge))

    merged, unmerged = with_trained_lora(True), with_trained_lora(False)
    assert hasattr(unmerged.llm, "peft_config") and not hasattr(merged.llm, "peft_config")
    answer = unmerged.generate(pixels, [PROMPT], apply_template=False, max_new_tokens=12)[0]
    torch.testing.assert_close(answer_logits(merged, pixels, answer), answer_logits(unmerged, pixels, answer),
                               rtol=1e-4, atol=1e-5)


def test_quantizing_a_llama_family_llm_keeps_every_added_norm():
    """A Llama-style LLM carries TinyGPT-V's QK LayerNorm and post-attention RMSNorm as added
    modules; the int8 copy (rebuilt by transformers) must have both back, with their weights."""
    pytest.importorskip("bitsandbytes")
    from omegaconf import OmegaConf

    from tinygpt_v.inference.loading import quantize_llm
    from tinygpt_v.models.llm import added_norm_keys
    from conftest import REPO
    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs/models/tiny_siglip_llama.yaml").model, resolve=True)
    section["lora"], section["trainable"] = None, ["projection"]  # quantisation comes after the LoRA merge
    torch.manual_seed(0)
    llm = build_model(section, verbose=False).llm
    keys = added_norm_keys(llm)
    assert any(".q_layernorm." in k for k in keys) and any(".post_layernorm." in k for k in keys)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if name in keys:
                param.normal_()  # trained values, not the init the rebuild would give
    try:
        quantized = quantize_llm(llm, "int8")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes cannot run int8 on this CPU: {e}")
    state, quantized_state = llm.state_dict(), quantized.state_dict()
    for key in keys:
        assert torch.equal(quantized_state[key], state[key].float()), key
