"""Our formats: trainable-weight checkpoints, self-contained exports, and conversions into them.

- `save_trainable(model, path)`: safetensors of the trainable parameters under our names (what
  the trainer writes as `checkpoint_{step}/model.safetensors`).
- `save_pretrained(model, folder)`: `model.safetensors` (every parameter), the tokenizer files
  and `config.yaml` (the model section with every external source nulled), written last so a
  folder with a config is always complete. `from_pretrained(folder)` needs nothing else.
- `convert_to_ours`: any supported foreign file -> our safetensors, checked against the model
  the config describes (built on the meta device: names and shapes, no memory).
- `convert_fused_phi`: the original's fused-qkv Phi-2 folder -> today's transformers layout.
- `save_original(model, path)`: the trainable parameters under the original's names, as its
  runner writes `checkpoint_{epoch}.pth` (`{"model": ...}`), for use with the original's code.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from .files import CheckpointError, read_state_dict, save_safetensors_atomic, write_text_atomic
from .keymaps import PHI, KeyTable, Mapped, Target, canonical, prefixed
from .loading import LoadReport, apply_plan, llm_heads, plan_load

FORMAT_METADATA = {"format": "tinygpt_v"}
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
# LLM config entries that describe a file or a run, not the architecture.
_LLM_CONFIG_NOISE = ("transformers_version", "model_type", "dtype", "torch_dtype", "architectures",
                     "_name_or_path", "auto_map", "quantization_config", "_attn_implementation_autoset")


def save_trainable(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """The parameters with requires_grad, under our names, atomically."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return save_safetensors_atomic(tensors, path, {**FORMAT_METADATA, "content": "trainable", **(metadata or {})})


# --- self-contained export ---------------------------------------------------------------------

def save_pretrained(model: nn.Module, folder: str | os.PathLike, model_config: Mapping | None = None) -> Path:
    """Write a folder `from_pretrained` rebuilds the model from, with no other file."""
    section = model_config if model_config is not None else getattr(model, "model_config", None)
    if section is None:
        raise ValueError("save_pretrained needs the model's `model:` config section: pass model_config=..., "
                         "or build the model with build_model (which records it as model.model_config)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = export_config(model, section)
    save_safetensors_atomic(model.state_dict(), folder / WEIGHTS_FILE, {**FORMAT_METADATA, "content": "full"})
    model.tokenizer.save_pretrained(str(folder))
    from .hub_export import write_hub_files
    write_hub_files(model, folder, section)  # config.json, generation config, model card (Hub convention)
    header = ("# Exported TinyGPT-V model: load with TinyGPTV.from_pretrained(<this folder>).\n"
              "# Weights are in model.safetensors; the tokenizer is this folder (path '.').\n")
    write_text_atomic(folder / CONFIG_FILE, header + OmegaConf.to_yaml(OmegaConf.create({"model": config})))
    return folder


def export_config(model: nn.Module, section: Mapping) -> dict:
    """The model section with external sources removed: pretrained paths nulled, the full LLM
    architecture written out (it may have come from a hub config), the tokenizer = this folder."""
    from ..config import to_plain
    config = copy.deepcopy(to_plain(section))
    config.pop("ckpt", None)
    for part in ("vision", "qformer", "llm"):
        sub = config.get(part) or {}
        if "pretrained" in sub:
            sub["pretrained"] = False if isinstance(sub["pretrained"], bool) else None
        if "checkpoint_path" in sub:
            sub["checkpoint_path"] = None
    llm = config["llm"]
    if llm.get("quantization"):
        raise ValueError("a quantised LLM cannot be exported; export the unquantised model and quantise on load")
    llm["config"] = {k: v for k, v in model.llm.config.get_text_config().to_diff_dict().items()
                     if k not in _LLM_CONFIG_NOISE}
    config["tokenizer"] = {"name": "hf", "path": "."}
    return config


def from_pretrained(folder: str | os.PathLike, verbose: bool = False):
    """Rebuild TinyGPTV from a `save_pretrained` folder and load every weight strictly."""
    from ..models import build_model
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(folder, f"not an exported TinyGPT-V model: no {CONFIG_FILE}")
    section = OmegaConf.to_container(OmegaConf.load(config_file).model, resolve=True)
    section["tokenizer"] = {"name": "hf", "path": str(folder)}
    state = read_state_dict(folder / WEIGHTS_FILE)  # fails early on a corrupt file, before building
    model = build_model(section, verbose=verbose)
    load_state_strict(model, state, str(folder / WEIGHTS_FILE))
    model.model_config = section
    return model


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Every parameter of the model from `state`, under our names, nothing left over."""
    plan = plan_load(model, state, source, parts={"all": list(model.state_dict())}, llm_heads=llm_heads(model))
    if not plan.report.ok or not plan.tensors:
        raise CheckpointError(source, f"does not fit the model; nothing was loaded.\n{plan.report}")
    apply_plan(model, plan)
    return plan.report


# --- conversions ---------------------------------------------------------------------------------

def convert_to_ours(model: nn.Module, sources: Iterable[str | os.PathLike], out: str | os.PathLike,
                    strict: bool = True) -> list[LoadReport]:
    """Map foreign files onto `model` (usually built on the meta device) and write the mapped
    tensors, under our names, to one safetensors file that `load_checkpoints` reads."""
    from .loading import model_parts
    tensors: dict[str, torch.Tensor] = {}
    reports = []
    for source in sources:
        plan = plan_load(model, read_state_dict(source), str(source), parts=model_parts(model),
                         llm_heads=llm_heads(model))
        if strict and not plan.report.ok:
            raise CheckpointError(source, f"does not fit the model; nothing was written.\n{plan.report}")
        tensors.update(plan.tensors)
        reports.append(plan.report)
    save_safetensors_atomic(tensors, out, {**FORMAT_METADATA, "content": "converted",
                                           "sources": json.dumps([str(s) for s in sources])})
    return reports


PHI_FUSED_TO_TODAY = KeyTable("Phi-2 fused query_key_value -> today's layout", prefixed("", "", PHI))


def convert_fused_phi_state(state: Mapping[str, torch.Tensor], num_heads: int,
                            source: str = "state dict") -> dict[str, torch.Tensor]:
    """A fused-qkv Phi state dict (transformers 4.36 layout) -> today's PhiForCausalLM names."""
    out: dict[str, torch.Tensor] = {}
    for key in state:
        found = PHI_FUSED_TO_TODAY.match(canonical(key))
        if not isinstance(found, Mapped):
            raise CheckpointError(source, f"'{key}' is not a Phi-2 parameter name")
        target = Target(found.targets, (None,) * len(found.targets), num_heads)
        value = found.rule.convert(state[key], target) if found.rule.convert else state[key]
        out.update(zip(found.targets, value if isinstance(value, tuple) else (value,)))
    return out


def convert_fused_phi(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A Phi-2 folder in the original's fused layout -> a folder `llm.pretrained` can point at:
    config.json (today's PhiConfig), model.safetensors, and the tokenizer files copied over."""
    source, out = Path(source), Path(out)
    config_file = source / "config.json"
    if not config_file.exists():
        raise CheckpointError(source, "expected a Phi-2 folder with config.json")
    config = json.loads(config_file.read_text())
    state = convert_fused_phi_state(read_state_dict(source), int(config["num_attention_heads"]), str(source))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS_FILE, {"format": "pt"})
    for key in ("auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config.update(model_type="phi", architectures=["PhiForCausalLM"])
    write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    for file in source.iterdir():  # tokenizer and generation files
        if file.suffix in (".json", ".txt", ".model") and file.name not in ("config.json",) \
                and not file.name.endswith(".index.json"):
            shutil.copy2(file, out / file.name)
    return out


# --- the original's layout -----------------------------------------------------------------------

# Our module prefix -> the original's (MiniGPT-4 / TinyGPT-V attribute names). The LLM keeps peft's
# wrapper names, as the original's state_dict has them (`llama_model.base_model.model.model...`).
_TO_ORIGINAL_PREFIXES = (("connector.", ""), ("qformer.query_tokens", "query_tokens"),
                         ("qformer.bert.", "Qformer.bert."), ("ln_vision.", "ln_vision."),
                         ("vision.model.", "visual_encoder."), ("llm.", "llama_model."))
# Q-Former: ours (Hugging Face naming) -> LAVIS's BERT naming, inverse of keymaps.QFORMER_LAVIS.
_QFORMER_TO_LAVIS = ((".attention.attention.", ".attention.self."),
                     (".crossattention.attention.", ".crossattention.self."),
                     ("Qformer.bert.layernorm.", "Qformer.bert.embeddings.LayerNorm."))


def original_name(name: str, peft_adapter: str | None = None) -> str:
    """Our parameter name -> the name the original's runner saves it under. `peft_adapter`:
    None writes LoRA weights as peft 0.2.0 does (`lora_A.weight`, the version the original's
    environment.yml pins); "default" as later peft versions (`lora_A.default.weight`)."""
    for ours, theirs in _TO_ORIGINAL_PREFIXES:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    else:
        raise KeyError(name)
    for ours, theirs in _QFORMER_TO_LAVIS:
        name = name.replace(ours, theirs)
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.(lora_[AB])\.default\.", rf".\1.{peft_adapter}." if peft_adapter else r".\1.", name)


def save_original(model: nn.Module, path: str | os.PathLike, peft_adapter: str | None = None,
                  epoch: int = 0) -> Path:
    """The trainable parameters under the original's names in its runner's file layout
    (`{"model", "optimizer", "config", "scaler", "epoch"}`; no optimizer state), loadable by
    the original's `load_checkpoint` and by `load_checkpoints` here. Only what the original's
    model has a place for: a per-projection LoRA or separate q/k/v base weights are refused."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    return write_original(trainable, path, peft_adapter, epoch)


def convert_to_original(source: str | os.PathLike, out: str | os.PathLike, peft_adapter: str | None = None) -> Path:
    """One of our checkpoints (`save_trainable` file or folder) -> the original's layout."""
    return write_original(read_state_dict(source), out, peft_adapter, source=str(source))


def write_original(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, peft_adapter: str | None = None,
                   epoch: int = 0, source: str | None = None) -> Path:
    out = {}
    for name, tensor in tensors.items():
        if re.search(r"\.(q_proj|k_proj|v_proj)\.", name):
            raise CheckpointError(source or path, f"'{name}' has no counterpart in the original, whose q/k/v are "
                                                  f"one fused layer with one adapter: train with "
                                                  f"model.lora.fused_qkv: true")
        try:
            out[original_name(name, peft_adapter)] = tensor.detach().cpu().clone()
        except KeyError:
            raise CheckpointError(source or path, f"'{name}' is not a TinyGPT-V parameter name") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": out, "optimizer": None, "config": {}, "scaler": None, "epoch": epoch}, path)
    return path
