"""Model parts and the TinyGPTV class, built from the `model:` section of a config."""
from __future__ import annotations

import importlib
from typing import Annotated

from ..config import register_section, to_plain
from ..registry import (CONNECTORS, LLMS, QFORMERS, TOKENIZERS, VISION_ENCODERS, ConfigError, Part,
                        PathOrHubId, Section, check_kwargs)
from .llm import apply_lora, family_lora_settings, lora_settings
from .parameters import GROUPS, check_trainable, set_trainable, trainable_table
from .tinygpt_v import IMAGE_MARKER, TinyGPTV

for _part in ("connector", "qformer", "tokenizer", "vision"):  # importing a part module registers its builders
    importlib.import_module(f"{__name__}.{_part}")

__all__ = ["TinyGPTV", "build_model", "GROUPS", "IMAGE_MARKER"]


def model_schema(
    vision: Annotated[dict, Part(VISION_ENCODERS)],
    connector: Annotated[dict, Part(CONNECTORS)],
    llm: Annotated[dict, Part(LLMS)],
    tokenizer: Annotated[dict, Part(TOKENIZERS)],
    qformer: Annotated[dict, Part(QFORMERS)] | None = None,
    lora: Annotated[dict, Section(lora_settings)] | None = None,
    trainable: list[str] = ("projection",),
    prompt_template: str = "{}",
    end_sym: str = "\n",
    max_txt_len: int = 32,
    max_context_len: int = 3800,
    ckpt: list[PathOrHubId] | PathOrHubId | None = None,
) -> None:
    """The `model:` section. `ckpt` files (ours or the original's) load after building, in order."""


@register_section("model")
def check_model_section(section, key: str = "model") -> None:
    check_kwargs(model_schema, section, key)
    check_trainable(list(section.get("trainable", [])), f"{key}.trainable")
    if "{}" not in section.get("prompt_template", "{}"):
        raise ConfigError(f"{key}.prompt_template", "must contain '{}' where the instruction goes")


def build_model(model_cfg, verbose: bool = True) -> TinyGPTV:
    """Build TinyGPTV from a `model:` section (DictConfig or dict); prints the trainable table."""
    cfg = to_plain(model_cfg)
    check_model_section(cfg)
    vision_encoder = VISION_ENCODERS.build(cfg["vision"], "model.vision")
    q_former = QFORMERS.build(cfg["qformer"], "model.qformer", encoder_width=vision_encoder.num_features) \
        if cfg.get("qformer") else None
    llm = LLMS.build(cfg["llm"], "model.llm")
    if cfg.get("lora"):
        lora = family_lora_settings(cfg["lora"], llm.config.model_type)
        cfg = {**cfg, "lora": lora}  # kept resolved (the family's targets), so an export says what was built
        llm = apply_lora(llm, **lora)
    text_tokenizer = TOKENIZERS.build(cfg["tokenizer"], "model.tokenizer")
    _check_vocab(text_tokenizer, llm)
    in_width = q_former.num_features if q_former is not None else vision_encoder.num_features
    projection = CONNECTORS.build(cfg["connector"], "model.connector", in_width=in_width,
                                  out_width=llm.config.get_text_config().hidden_size)
    model = TinyGPTV(vision_encoder, q_former, projection, llm, text_tokenizer,
                     **{k: cfg[k] for k in ("prompt_template", "end_sym", "max_txt_len", "max_context_len")
                        if k in cfg})
    model.model_config = cfg  # kept for export (save_pretrained)
    if (cfg.get("qformer") or {}).get("pretrained") and model.ln_vision is not None:
        from ..checkpoints import load_ln_vision
        load_ln_vision(model.ln_vision, cfg["qformer"]["pretrained"])  # BLIP-2 ships it with the Q-Former
    trainable = list(cfg.get("trainable", ["projection"]))
    groups = set_trainable(model, trainable)
    model.frozen_parts = tuple(part for part, part_groups in FROZEN_PARTS.items()
                               if not set(part_groups) & set(trainable))
    model.train()
    if cfg.get("ckpt"):
        from ..checkpoints import load_checkpoints
        load_checkpoints(model, cfg["ckpt"] if isinstance(cfg["ckpt"], list) else [cfg["ckpt"]])
    if verbose:
        print(trainable_table(groups), flush=True)
    return model


# Parts that are put in eval mode when none of their groups train.
FROZEN_PARTS = {"vision": ("vision",), "ln_vision": ("ln_vision",), "qformer": ("qformer", "query_tokens")}


def _check_vocab(text_tokenizer, llm) -> None:
    vocab = llm.get_input_embeddings().num_embeddings
    if len(text_tokenizer) > vocab:
        raise ConfigError("model.tokenizer", f"tokenizer has {len(text_tokenizer)} tokens but the LLM's "
                                             f"embedding has only {vocab} rows")
