"""Getting a model ready to answer: load it, then place it (device, dtypes, quantisation).

`load_model(source, settings)` accepts a built TinyGPTV, an exported folder (config.yaml +
*.safetensors), a config file with a `model:` section, or a `model:` section itself; with
`source=None` the model comes from `settings.checkpoint` alone (an exported folder, or a trainer
checkpoint whose meta.json records its model section). A model section that differs from the one
the checkpoint recorded is refused naming the keys (evaluation.loading.check_model_matches).
`prepare_model(model, settings)` applies the low-memory switches of `InferenceSettings`:

- the LLM in fp32 / fp16 / bf16, or quantised to int8 (LLM.int8) / nf4 through bitsandbytes;
- the vision encoder beside the LLM or on the CPU, in its own dtype;
- ln_vision, the Q-Former and the connector stay fp32 beside the LLM: `encode_image` runs them
  in fp32 and they are a small share of the weights.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models import TinyGPTV, build_model
from ..models.llm import add_norms_like, added_norm_keys
from ..registry import ConfigError
from .settings import InferenceSettings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(source, settings: InferenceSettings | None = None) -> TinyGPTV:
    """A TinyGPTV from `source`, with `settings.checkpoint` loaded, placed by `settings`."""
    settings = settings or InferenceSettings()
    if source is None:
        source = model_from_checkpoint(settings.checkpoint)
        if isinstance(source, Path):  # an exported folder: complete, nothing more to load
            return prepare_model(TinyGPTV.from_pretrained(source), settings)
    elif settings.checkpoint and not isinstance(source, TinyGPTV):
        from ..evaluation.loading import check_model_matches
        check_model_matches(_model_section(source), settings.checkpoint)
    model = source if isinstance(source, TinyGPTV) else _build(source)
    if settings.checkpoint:
        from ..checkpoints import load_checkpoints  # ours, an export folder, or the original's .pth
        load_checkpoints(model, [settings.checkpoint])
    return prepare_model(model, settings)


def model_from_checkpoint(checkpoint):
    """What to build when the config has no `model:` section: the exported folder itself (a
    Path), or the model section a trainer checkpoint's meta.json recorded (its `ckpt:`, the
    stage before, dropped: the checkpoint is loaded over it)."""
    if not checkpoint:
        raise ConfigError("model", "no model section: give a config with `model:` (e.g. defaults: "
                                   "[models/tinygpt_v.yaml]) or a checkpoint that carries one (--checkpoint / "
                                   "inference.checkpoint: an exported folder, or a trainer checkpoint folder)")
    path = Path(checkpoint).expanduser()
    if (path / "config.yaml").is_file():
        return path
    from ..evaluation.loading import checkpoint_model_section
    section = checkpoint_model_section(path)
    if section is None:
        raise ConfigError("model", f"no model section, and {checkpoint} does not carry one (neither an exported "
                                   f"folder with config.yaml nor a trainer checkpoint with meta.json): give a "
                                   f"config with `model:`")
    return {key: value for key, value in section.items() if key != "ckpt"}


def _model_section(source):
    if isinstance(source, (str, os.PathLike)):
        from ..config import load_config
        return load_config(Path(source).expanduser()).model
    return source["model"] if "model" in source else source


def _build(source) -> TinyGPTV:
    """From an exported folder, a config file with a `model:` section, or such a section."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return TinyGPTV.from_pretrained(path)
        from ..config import load_config
        source = load_config(path).model
    return build_model(source["model"] if "model" in source else source, verbose=False)


# --- placement ------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on a GPU (as the paper runs), fp32 on the CPU (fp16 matmuls are slow there)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def prepare_model(model: TinyGPTV, settings: InferenceSettings) -> TinyGPTV:
    """Apply device, dtypes, LoRA merging and quantisation; returns the model in eval mode."""
    device = resolve_device(settings.device)
    model.llm = _placed_llm(model.llm, settings, device)
    for part in (model.ln_vision, model.qformer, model.connector):
        if part is not None:
            part.to(device=device, dtype=torch.float32)
    vision_device = torch.device("cpu") if settings.vision_device == "cpu" else device
    vision_dtype = resolve_dtype(settings.vision_precision, vision_device)
    model.vision.to(device=vision_device)
    if hasattr(model.vision, "set_precision"):  # Linear/Conv weights only, as the original (models/vision.py)
        model.vision.set_precision(vision_dtype)
    else:
        model.vision.to(dtype=vision_dtype)
    return model.eval()


def _placed_llm(llm: nn.Module, settings: InferenceSettings, device: torch.device) -> nn.Module:
    if getattr(llm, "is_quantized", False):
        return llm  # quantised when built (model.llm.quantization): its loader placed it; merging would dequantise
    dtype = resolve_dtype(settings.precision, device)
    if settings.merge_lora or settings.quantization:
        llm = merged_llm(llm)
    if settings.quantization:
        return quantize_llm(llm, settings.quantization, dtype, device)
    return llm.to(device=device, dtype=dtype)


def merged_llm(llm: nn.Module) -> nn.Module:
    """The LLM with its LoRA adapters (if any) folded into the base weights."""
    return llm.merge_and_unload() if hasattr(llm, "merge_and_unload") else llm


# --- quantisation -----------------------------------------------------------------------------

def bitsandbytes_config(mode: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise ConfigError("inference.quantization", f"expected int8 or nf4, got {mode!r}")


def quantize_llm(llm: nn.Module, mode: str, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu") -> nn.Module:
    """A bitsandbytes int8 / nf4 copy of an (unwrapped) HF causal LM, on `device`.

    The weights go through transformers' own quantising loader (a temporary folder), which
    works for any weights the model holds: pretrained, trained, or LoRA-merged. TinyGPT-V's
    added norms (post-attention RMSNorm; QK LayerNorm where the family lacks one) are not part
    of the HF class, so they are left out of the folder and put back, in fp32, afterwards; the
    other non-Linear weights load in `dtype`.
    """
    if hasattr(llm, "peft_config"):
        raise ValueError("merge the LoRA adapters first (merged_llm) before quantising")
    from transformers import AutoModelForCausalLM
    if mode == "int8" and dtype != torch.float16:
        # LLM.int8 computes in fp16 and logs the cast on every matmul: expected here, so quiet it
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    state = llm.state_dict()
    added = added_norm_keys(llm)  # TinyGPT-V's norms: no transformers class has them
    with tempfile.TemporaryDirectory(prefix="tinygpt_v_quant_") as folder:
        llm.save_pretrained(folder, state_dict={n: t for n, t in state.items() if n not in added})
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=bitsandbytes_config(mode, dtype), dtype=dtype,
            device_map={"": str(torch.device(device))})
    if added:
        add_norms_like(quantized, llm)
    return quantized.eval()
