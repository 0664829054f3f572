"""The model to evaluate.

`evaluation.checkpoint` may be
- an exported folder (`save_pretrained`: config.yaml + model.safetensors + tokenizer): the model
  is rebuilt from it alone, the config's `model:` section is not used;
- anything `tinygpt_v.checkpoints.load_checkpoints` reads (our trainer checkpoint folder or
  `.safetensors`, the original's stage `.pth`): loaded into the model the `model:` section builds;
- null: the `model:` section alone (its own `ckpt:` list included).
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from ..registry import ConfigError
from .settings import EvalSettings

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(cfg, settings: EvalSettings, device: torch.device):
    checkpoint = settings.checkpoint
    if checkpoint and (Path(checkpoint) / "config.yaml").is_file():
        from ..checkpoints import from_pretrained
        model = from_pretrained(checkpoint)
    else:
        set_seed(settings.seed)  # parts no checkpoint holds (a demo's random frozen encoder) as in training
        model = _build(cfg)
        if checkpoint:
            from ..checkpoints import load_checkpoints
            load_checkpoints(model, [checkpoint])
    # auto: half precision on a GPU (the original evaluates in fp16), the built dtypes on CPU.
    dtype = _DTYPES.get(settings.precision, torch.float16 if device.type == "cuda" else None)
    model.to(device)
    if dtype is not None:
        place_precision(model, dtype)
    return model.eval()


def place_precision(model, dtype: torch.dtype):
    """The original's evaluation precision, as inference places it: the LLM in `dtype`; the vision
    tower's matmul weights in `dtype` under autocast (`set_precision`, the original's
    convert_weights_to_fp16); ln_vision, the Q-Former and the projection in fp32 (the original
    keeps them fp32). encode_image feeds ln_vision fp32 tokens and casts the projection's output
    to the LLM's dtype, so every part receives its own weights' dtype: a half ln_vision would
    meet fp32 tokens ("mixed dtype (CPU)" in bf16 on CPU; CUDA's layer_norm refuses it too)."""
    model.llm.to(dtype=dtype)
    vision = getattr(model, "vision", None)
    if hasattr(vision, "set_precision"):
        vision.set_precision(dtype)
    elif vision is not None:
        vision.to(dtype=dtype)
    for name in ("ln_vision", "qformer", "connector"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(dtype=torch.float32)
    return model


def _build(cfg):
    if "model" not in cfg:
        raise ConfigError("model", "evaluation needs a model section (include a preset from configs/models) "
                                   "or evaluation.checkpoint pointing at an exported folder")
    from ..models import build_model
    return build_model(cfg.model, verbose=False)


def model_image_size(model) -> int | None:
    """The input size the model's vision encoder was built for."""
    size = getattr(model, "image_size", None)
    if size is None and getattr(model, "vision", None) is not None:
        size = getattr(model.vision, "image_size", None)
    return size
