"""The `inference:` config section, read by the terminal chat, the web demo and batch prediction.

    inference:
      checkpoint: path/to/stage4.safetensors   # ours, an exported folder, or the original's .pth
      template: stage4                         # stage1-3 | stage4 | {turn: "... {} ...", after_answer: "..."}
      device: auto                             # auto (cuda when there is one) | cpu | cuda | cuda:1
      precision: auto                          # the LLM's dtype: auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
      quantization: null                       # int8 | nf4: the LLM through bitsandbytes
      vision_device: auto                      # auto (beside the LLM) | cpu
      vision_precision: auto                   # as precision, for the vision encoder
      generation: {max_new_tokens: 300, num_beams: 1, temperature: 0.0, top_p: 0.9, repetition_penalty: 1.0,
                   static_cache: false, compile: false}   # compile: the decode step as one graph
      max_image_pixels: 89478485               # larger images are refused from the header (decompression bombs)

Low-memory modes are these switches: `precision: fp16|bf16`, `quantization: int8|nf4`,
`vision_device: cpu` / `vision_precision: fp16`, and `device: cpu` for pure CPU inference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..config import register_section, to_plain
from ..data.base import DEFAULT_MAX_IMAGE_PIXELS
from ..registry import (Bound, ConfigError, LocalPath, NonNegativeFloat, PositiveFloat, PositiveInt, Section,
                        check_kwargs)

Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(kw_only=True)
class GenerationSettings:
    max_new_tokens: PositiveInt = 300
    num_beams: PositiveInt = 1
    temperature: NonNegativeFloat = 0.0  # 0: greedy decoding; above 0: sampling at this temperature
    top_p: Annotated[float, Bound(gt=0, le=1)] = 0.9  # nucleus sampling; only used when sampling
    repetition_penalty: PositiveFloat = 1.0
    static_cache: bool = False  # preallocated KV cache (fixed shapes); same answers
    compile: bool = False  # torch.compile the decode step (with static_cache; CUDA graphs on a GPU)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `TinyGPTV.generate`."""
        sampling = self.temperature > 0
        decode = {k: True for k in ("static_cache", "compile") if getattr(self, k)}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": sampling,
                "temperature": self.temperature if sampling else 1.0, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, **decode}

    def replace(self, **changes) -> "GenerationSettings":
        """A copy with `changes` applied; None values are ignored (an untouched UI control)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(kw_only=True)
class InferenceSettings:
    checkpoint: LocalPath | None = None
    template: str | dict = "stage4"
    device: str = "auto"
    precision: Precision = "auto"
    quantization: Literal["int8", "nf4"] | None = None
    vision_device: Literal["auto", "cpu"] = "auto"
    vision_precision: Precision = "auto"
    image_size: int | None = None  # null: the vision encoder's own
    merge_lora: bool = True        # fold LoRA into the LLM weights: same answers, faster tokens
    max_image_pixels: PositiveInt | None = DEFAULT_MAX_IMAGE_PIXELS  # null: no limit
    generation: Annotated[dict, Section(GenerationSettings)] = field(default_factory=dict)

    @property
    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(**self.generation)


@register_section("inference")
def check_inference(section, key: str = "inference") -> None:
    read_inference_settings(section, key)


def read_inference_settings(section, key: str = "inference") -> InferenceSettings:
    """Checked settings from an `inference:` section (None or missing: all defaults)."""
    plain = to_plain(section) if section is not None else {}
    if not isinstance(plain, dict):
        raise ConfigError(key, "expected a section (mapping)")
    check_kwargs(InferenceSettings, plain, key)
    settings = InferenceSettings(**plain)
    from .templates import get_template
    get_template(settings.template)  # an unknown preset fails at load time, not at the first question
    return settings
