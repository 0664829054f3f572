"""Named parameter groups, and choosing the trainable ones from YAML.

Every parameter of TinyGPTV belongs to exactly one group. A stage config says, for example,
`trainable: [projection, llm_norms, lora]`; everything else is frozen. Trainable parameters
are kept in fp32 whatever the dtype of the frozen weights around them.

`llm_norms` holds the WEIGHTS of every norm in the LLM (input_layernorm, q_layernorm,
k_layernorm, post_layernorm, final_layernorm), exactly what the original trains
(`base_model.init_llm` sets requires_grad on `.weight` only). The LayerNorm biases are a group
of their own, `llm_norm_biases`, frozen unless a config asks for them: the original never
trains them, so its checkpoints do not hold them.
"""
from __future__ import annotations

from torch import nn

from ..registry import ConfigError

GROUPS = ("vision", "ln_vision", "qformer", "query_tokens", "projection", "llm_norms", "llm_norm_biases", "lora",
          "llm")

# Module prefix -> group, checked in order (the first match wins).
_PREFIX_GROUPS = (
    ("vision.", "vision"),
    ("ln_vision.", "ln_vision"),
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.", "qformer"),
    ("connector.", "projection"),
)


def is_norm(module: nn.Module) -> bool:
    """torch's norms and every transformers norm class by its name: LlamaRMSNorm, Qwen2RMSNorm,
    Qwen3RMSNorm (also its q_norm / k_norm), MistralRMSNorm, GemmaRMSNorm, Gemma2RMSNorm,
    Phi3RMSNorm, Phi's LayerNorms, and the norms models/llm.py adds (LayerNorm, RMSNorm)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm"))


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """group -> {parameter name: parameter}, covering every parameter exactly once."""
    norm_params = {id(p) for m in model.llm.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUPS}
    for name, param in model.named_parameters():
        groups[_group_of(name, param, norm_params)][name] = param
    return groups


def _group_of(name: str, param: nn.Parameter, norm_params: set[int]) -> str:
    for prefix, group in _PREFIX_GROUPS:
        if name.startswith(prefix):
            return group
    if not name.startswith("llm."):
        raise KeyError(f"parameter '{name}' belongs to no group; add its prefix to _PREFIX_GROUPS")
    if ".lora_" in name:
        return "lora"
    if id(param) not in norm_params:
        return "llm"
    return "llm_norm_biases" if name.endswith(".bias") else "llm_norms"


# Part section -> the groups its `pretrained` source restores (BLIP-2's file carries ln_vision).
PRETRAINED_SOURCES = {"vision": ("vision",), "qformer": ("qformer", "query_tokens", "ln_vision"),
                      "llm": ("llm", "llm_norms", "llm_norm_biases")}


def random_init_groups(model_config: dict) -> list[str]:
    """Groups that no `pretrained` source restores: the connector and LoRA always, the others
    when their part is built from random weights."""
    restored = {group for part, groups in PRETRAINED_SOURCES.items() if _has_source(model_config.get(part))
                for group in groups}
    return [group for group in GROUPS if group not in restored]


def _has_source(section: dict | None) -> bool:
    return bool(section and (section.get("pretrained") or section.get("checkpoint_path")))


def checkpoint_parameter_names(model: nn.Module) -> list[str]:
    """What a training checkpoint holds: the trainable parameters, plus frozen ones that were
    randomly initialised. Without the latter, a model built from random parts (the demo, the
    tests, ablations without pretrained weights) could only be reloaded with the same seed."""
    keep = set(random_init_groups(getattr(model, "model_config", None) or {}))
    return [name for group, params in parameter_groups(model).items() for name, p in params.items()
            if p.requires_grad or group in keep]


def check_trainable(trainable: list[str], key: str = "model.trainable") -> None:
    for i, group in enumerate(trainable):
        if group not in GROUPS:
            raise ConfigError(f"{key}[{i}]", f"unknown parameter group '{group}'; groups: {', '.join(GROUPS)}")


def set_trainable(model: nn.Module, trainable: list[str]) -> dict[str, dict[str, nn.Parameter]]:
    """Unfreeze exactly the chosen groups (fp32), freeze the rest; returns the groups."""
    check_trainable(trainable)
    groups = parameter_groups(model)
    for group in trainable:
        if not groups[group]:
            raise ConfigError("model.trainable", f"group '{group}' has no parameters in this model "
                                                 f"(e.g. `lora` needs a `model.lora` section)")
    for group, params in groups.items():
        in_fp32 = group in trainable or FP32_BESIDE.get(group) in trainable
        for param in params.values():
            param.requires_grad_(group in trainable)
            if in_fp32 and param.is_floating_point():
                param.data = param.data.float()
    return groups


# Frozen groups kept in fp32 when another group trains: a norm's bias must share its trainable
# weight's dtype (the original casts the frozen biases to fp32 too, `base_model.init_llm`).
FP32_BESIDE = {"llm_norm_biases": "llm_norms"}


def trainable_table(groups: dict[str, dict[str, nn.Parameter]]) -> str:
    """A table of group, tensor count, parameter count and whether it trains."""
    rows = [("group", "tensors", "parameters", "trainable")]
    total = trained = 0
    for group, params in groups.items():
        count = sum(p.numel() for p in params.values())
        is_trained = any(p.requires_grad for p in params.values())
        total += count
        trained += count if is_trained else 0
        rows.append((group, str(len(params)), f"{count:,}", "yes" if is_trained else "no"))
    rows.append(("total", "", f"{total:,}", f"{trained:,} ({100 * trained / max(total, 1):.2f}%)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
