"""Loading weights into TinyGPTV or one of its parts, with a report.

Every load runs in two phases. `plan_load` reads the file, maps its names through a key table,
converts (fused qkv split, position-embedding resampling), and checks names and shapes against
the model, touching nothing. Only when the plan is clean (or `strict=False`) does `apply_plan`
copy. So a corrupt file, a wrong shape or an unknown key leaves the model exactly as it was.

Strictness is per part: a file must hold *every* weight of each part it holds any weight of.
For a whole model the parts are the parameter groups of `models.parameters` (with TinyGPT-V's
added norms a part of their own, see `model_parts`): a stage checkpoint with LoRA weights must
hold all of them, and need not hold the vision encoder. Loading into one module (EVA, Q-Former,
ln_vision) requires the whole module.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .files import CheckpointError, read_state_dict
from .keymaps import (DROPPABLE_BLOCKS, EVA_FILE, HF_BLIP2, ORIGINAL, TABLES, KeyTable, Mapped, Skipped, Target,
                      canonical, pick_table)

log = logging.getLogger(__name__)
LISTED = 20  # names shown per list in a report; the counts are always complete


@dataclass
class LoadReport:
    source: str
    format: str
    matched: list[str] = field(default_factory=list)     # our names that receive a tensor
    missing: list[str] = field(default_factory=list)     # our names in a covered part the file lacks
    unexpected: list[str] = field(default_factory=list)  # file keys with no place in this model
    mismatched: list[str] = field(default_factory=list)  # shape disagreements
    skipped: list[str] = field(default_factory=list)     # file keys deliberately unused, with why
    kept: list[str] = field(default_factory=list)        # our names this format never holds, with why

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (f"{self.source} ({self.format}): {len(self.matched)} matched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches, "
                f"{len(self.skipped)} skipped, {len(self.kept)} kept")

    def __str__(self) -> str:
        lines = [self.summary()]
        for title in ("missing", "unexpected", "mismatched", "skipped", "kept"):
            names = getattr(self, title)
            lines += [f"  {title}: {name}" for name in names[:LISTED]]
            if len(names) > LISTED:
                lines.append(f"  ... {len(names) - LISTED} more {title}")
        return "\n".join(lines)


@dataclass
class LoadPlan:
    tensors: dict[str, torch.Tensor]   # our actual (module-relative) name -> tensor to copy
    report: LoadReport


def plan_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, prefix: str = "",
              parts: Mapping[str, Iterable[str]] | None = None, tables: Iterable[KeyTable] = TABLES,
              llm_heads: int | None = None) -> LoadPlan:
    """Map `state` onto `module`, whose names are `prefix` + its own in TinyGPTV terms (e.g.
    "vision.model." for the bare Eva). `parts`: part -> our names (module-relative); a file
    must cover every name of a part it touches. None: the module is one part."""
    shapes = {name: tensor.shape for name, tensor in module.state_dict().items()}
    ours = {canonical(prefix + name): name for name in shapes}
    canon_keys = {canonical(key): key for key in state}
    if len(canon_keys) < len(state):
        raise CheckpointError(source, "holds the same weight twice (with and without peft's wrapper names)")
    table, recognised = pick_table(canon_keys, tables)
    if not recognised:
        raise CheckpointError(source, f"no key is recognised by any known format "
                                      f"(first keys: {list(state)[:5]})")
    report = LoadReport(source, table.name)
    tensors: dict[str, torch.Tensor] = {}
    for canon_key, key in canon_keys.items():
        found = table.match(canon_key, ours)
        if found is None:
            report.unexpected.append(key)
        elif isinstance(found, Skipped):
            report.skipped.append(f"{key} ({found.reason})")
        elif not any(t.startswith(prefix) for t in found.targets):
            report.skipped.append(f"{key} (not part of {prefix.rstrip('.') or 'this model'})")
        elif all(_dropped_block(t, ours) for t in found.targets):
            report.skipped.append(f"{key} (EVA block beyond this model's depth; BLIP-2 uses 39 of EVA-CLIP's 40)")
        else:
            _plan_key(key, state, found, ours, shapes, llm_heads, tensors, report)
    missing = _missing(tensors, parts) if parts is not None else sorted(set(shapes) - set(tensors))
    kept = _kept(table, tensors, ours)
    report.missing = [name for name in missing if name not in kept]
    report.kept = [f"{name} ({reason})" for name, reason in sorted(kept.items())]
    report.matched = sorted(tensors)
    return LoadPlan(tensors, report)


def _kept(table: KeyTable, tensors: Mapping[str, torch.Tensor], ours: Mapping[str, str]) -> dict[str, str]:
    """Our names that a file of this format never holds by design (e.g. the norm biases the
    original never trains), when the file holds weights of the LLM at all: name -> reason."""
    if not table.kept or not any(canon.startswith("llm.") for canon, name in ours.items() if name in tensors):
        return {}
    reasons = {name: table.kept_reason(canon) for canon, name in ours.items() if name not in tensors}
    return {name: reason for name, reason in reasons.items() if reason}


def _plan_key(key, state, found: Mapped, ours, shapes, llm_heads, tensors, report) -> None:
    """Convert one file tensor into its target(s), recording anything that does not fit."""
    names = tuple(ours.get(t) for t in found.targets)
    target = Target(found.targets, tuple(shapes[n] if n else None for n in names), llm_heads)
    tensor = state[key]
    try:
        converted = found.rule.convert(tensor, target) if found.rule.convert else tensor
    except ValueError as e:
        report.mismatched.append(f"{key}: {e}")
        return
    converted = converted if isinstance(converted, tuple) else (converted,)
    for canon_target, name, value in zip(found.targets, names, converted):
        if name is None:
            report.unexpected.append(f"{key} -> {canon_target}")
        elif tuple(value.shape) != tuple(shapes[name]):
            report.mismatched.append(f"{key} -> {name}: file {tuple(value.shape)}, model {tuple(shapes[name])}")
        elif name in tensors:
            report.unexpected.append(f"{key} -> {name} (already given by another key)")
        else:
            tensors[name] = value


def _dropped_block(target: str, ours: Mapping[str, str]) -> bool:
    found = DROPPABLE_BLOCKS.match(target)
    if not found or target in ours:
        return False
    block = f"vision.model.blocks.{found.group(1)}."
    return not any(name.startswith(block) for name in ours)


def _missing(tensors: Mapping[str, torch.Tensor], parts: Mapping[str, Iterable[str]]) -> list[str]:
    missing = []
    for names in parts.values():
        names = list(names)
        if any(name in tensors for name in names):
            missing += [name for name in names if name not in tensors]
    return sorted(missing)


@torch.no_grad()
def apply_plan(module: nn.Module, plan: LoadPlan) -> None:
    """Copy the planned tensors into the module's parameters and buffers (casting dtype)."""
    current = module.state_dict(keep_vars=True)
    for name, tensor in plan.tensors.items():
        if current[name].device.type != "meta":
            current[name].copy_(tensor.to(dtype=current[name].dtype))


def load_into(module: nn.Module, source: str | os.PathLike, *, strict: bool = True, **plan_kwargs) -> LoadReport:
    """Read `source`, plan, and copy when clean; raises CheckpointError (model untouched) when
    strict and the report shows missing, unexpected or mis-shaped weights."""
    state = read_state_dict(source)
    plan = plan_load(module, state, str(source), **plan_kwargs)
    if strict and not plan.report.ok:
        raise CheckpointError(source, f"does not fit the model; nothing was loaded.\n{plan.report}")
    if strict and not plan.tensors:
        raise CheckpointError(source, f"holds no weights for this model.\n{plan.report}")
    apply_plan(module, plan)
    log.info("%s", plan.report.summary())
    return plan.report


# --- the entry points the model builders call -------------------------------------------------

def load_checkpoints(model: nn.Module, paths: Iterable[str | os.PathLike], strict: bool = True) -> list[LoadReport]:
    """Load each file into TinyGPTV, in order: our checkpoint folder or `.safetensors`, the
    original's `.pth` (runner format), a LAVIS BLIP-2 / EVA file, a Hugging Face BLIP-2 folder
    or a Phi-2 state dict. Each is strict for the parameter groups it touches."""
    return [load_into(model, path, strict=strict, parts=model_parts(model), llm_heads=llm_heads(model))
            for path in paths]


def load_eva_vit_g(eva: nn.Module, source: str | os.PathLike, strict: bool = True) -> LoadReport:
    """EVA ViT-g weights into timm's Eva: LAVIS `eva_vit_g.pth` (blocks beyond the model's
    depth dropped), a LAVIS/MiniGPT-4 model file (`visual_encoder.*`) or a Hugging Face BLIP-2
    folder (`vision_model.*`). The position embedding is resampled bicubically to the model's grid."""
    return load_into(eva, source, strict=strict, prefix="vision.model.", tables=(EVA_FILE, ORIGINAL, HF_BLIP2))


def load_blip2_qformer(qformer: nn.Module, source: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Query tokens and Q-Former from a LAVIS BLIP-2 file (`blip2_pretrained_flant5xxl.pth`) or
    a Hugging Face BLIP-2 folder; their other parts are skipped."""
    return load_into(qformer, source, strict=strict, prefix="qformer.", tables=(ORIGINAL, HF_BLIP2))


def load_ln_vision(ln_vision: nn.Module, source: str | os.PathLike, strict: bool = True) -> LoadReport:
    """BLIP-2's ln_vision from the same sources as the Q-Former (LAVIS `ln_vision.*`, Hugging
    Face `vision_model.post_layernorm.*`). It lives on TinyGPTV, not on the Q-Former module."""
    return load_into(ln_vision, source, strict=strict, prefix="ln_vision.", tables=(ORIGINAL, HF_BLIP2))


# The norms TinyGPT-V adds inside Phi-2. A Phi-2 file holds the LLM's own norms but never these
# (they start fresh), so they are a part of their own rather than of `llm_norms`.
ADDED_NORMS = re.compile(r"\.(q_layernorm|k_layernorm|post_layernorm)\.")


def model_parts(model: nn.Module) -> dict[str, list[str]]:
    """Part -> names, the unit of strictness for whole-model loads: the parameter groups of
    models.parameters, with groups split where real files hold only a piece of them:
    TinyGPT-V's added norms (weights, biases) apart from Phi-2's own, and each connector layer
    apart (MiniGPT-4's checkpoint holds `llama_proj` but not TinyGPT-V's fresh `llama_proj2`)."""
    from ..models.parameters import parameter_groups
    parts = {group: list(params) for group, params in parameter_groups(model).items()}
    for group, added in (("llm_norms", "added_norms"), ("llm_norm_biases", "added_norm_biases")):
        names = parts.pop(group)
        parts[group] = [name for name in names if not ADDED_NORMS.search(name)]
        parts[added] = [name for name in names if ADDED_NORMS.search(name)]
    for name in parts.pop("projection"):  # connector.<layer>.<param>
        layer = name.split(".")[1] if name.count(".") >= 2 else ""
        parts.setdefault(f"projection:{layer}" if layer else "projection", []).append(name)
    return parts


def llm_heads(model: nn.Module) -> int | None:
    llm = getattr(model, "llm", model)
    config = getattr(llm, "config", None)
    if config is None:
        return None
    return getattr(config.get_text_config(), "num_attention_heads", None)
