"""The model to evaluate.

`evaluation.checkpoint` may be
- an exported folder (`save_pretrained`: config.yaml + model.safetensors + tokenizer): the model
  is rebuilt from it alone, the config's `model:` section is not used;
- anything `tinygpt_v.checkpoints.load_checkpoints` reads (our trainer checkpoint folder or
  `.safetensors`, the original's stage `.pth`): loaded into the model the `model:` section builds;
- null: the `model:` section alone (its own `ckpt:` list included).

A trainer checkpoint's meta.json records the `model:` section it was trained with; a model
section that builds another architecture (other sizes, a Q-Former the checkpoint never had, ...)
is refused naming the differing keys (`check_model_matches`), since the missing weights would
stay random and score 0 without a word.
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from ..checkpoints import CheckpointError
from ..registry import ConfigError
from .settings import EvalSettings

META_FILE = "meta.json"  # written by the trainer next to every checkpoint's weights
# Keys that say where weights come from or how they were trained / placed, not what is built:
# they may differ between the checkpoint's run and the config that loads it.
NOT_ARCHITECTURE = {"ckpt", "trainable", "pretrained", "gradient_checkpointing", "grad_checkpointing", "dropout",
                    "precision", "dtype", "quantization", "prompt_template", "end_sym", "max_txt_len",
                    "max_context_len"}


class ModelMismatchError(CheckpointError):
    """The model section builds another model than the checkpoint was trained as."""

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
            check_model_matches(cfg.model, checkpoint)
            from ..checkpoints import load_checkpoints
            load_checkpoints(model, [checkpoint])
    if settings.merge_lora:  # LoRA folded into the weights: one matmul per projection when decoding
        from ..inference.loading import merged_llm
        model.llm = merged_llm(model.llm)
    model.decode_options = {"static_cache": settings.static_cache, "compile": settings.compile}
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


# --- the model section against the checkpoint's ---------------------------------------------------

def checkpoint_model_section(checkpoint) -> dict | None:
    """The `model:` section recorded in a trainer checkpoint's meta.json (the folder, or the
    folder of a weight file inside it); None when there is none (a foreign .pth, an export)."""
    path = Path(checkpoint).expanduser()
    for folder in (path, path.parent):
        meta = folder / META_FILE
        if meta.is_file():
            import json
            try:
                config = json.loads(meta.read_text()).get("config") or {}
            except (OSError, ValueError, AttributeError):
                return None  # a damaged meta.json is the resume code's business, not a model check
            model = config.get("model") if isinstance(config, dict) else None
            return model if isinstance(model, dict) else None
    return None


def model_differences(wanted, recorded, prefix: str = "model") -> list[str]:
    """Dotted keys whose values differ ("key: config X, checkpoint Y"), architecture keys only."""
    from ..config import to_plain
    wanted, recorded = to_plain(wanted), to_plain(recorded)
    if isinstance(wanted, dict) and isinstance(recorded, dict):
        out = []
        for key in sorted(set(wanted) | set(recorded), key=str):
            if key in NOT_ARCHITECTURE:
                continue
            out += model_differences(wanted.get(key), recorded.get(key), f"{prefix}.{key}")
        return out
    return [] if wanted == recorded else [f"{prefix}: config {_show(wanted)}, checkpoint {_show(recorded)}"]


def _show(value) -> str:
    if isinstance(value, dict):  # a whole part on one side only: its name says enough
        return f"a {value['name']} section" if "name" in value else "a section"
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_model_matches(model_section, checkpoint) -> None:
    """Refuse a model section that differs from the one the checkpoint recorded."""
    recorded = checkpoint_model_section(checkpoint)
    if recorded is None:
        return
    differences = model_differences(model_section, recorded)
    if differences:
        raise ModelMismatchError(checkpoint, f"the model section does not match the one recorded in its {META_FILE}: "
                                             + "; ".join(differences)
                                             + ". Use the training run's model section (or, in the chat, drop "
                                               "`model:` and let the checkpoint supply it)")
