"""Key tables: a foreign checkpoint's parameter names -> ours, with the conversions between.

Each table is a list of rules read top to bottom: `Rule(their name, our name(s), convert)`.
Names are patterns with placeholders (`{i}` a layer index, `{p}` weight|bias, ...; see
PLACEHOLDERS). `Unused` lists what a format holds that TinyGPT-V deliberately does not use
(BLIP-2's text branch, EVA-CLIP's head): reported as skipped, never an error.

All names are canonical on both sides: peft's wrapping is not part of a weight's identity, so
`llm.base_model.model.X` is `llm.X`, `q_proj.base_layer.weight` is `q_proj.weight` and
`lora_A.default.weight` is `lora_A.weight` (see `canonical`). One table therefore serves a
model with and without LoRA, and the original's `llama_model.base_model.model.model.layers`
reads as `llama_model.model.layers`.

Our side (the TinyGPTV module tree):
  vision.model.*       timm Eva (LAVIS EVA names one to one)
  ln_vision.*          LayerNorm(1408) from BLIP-2
  qformer.query_tokens, qformer.bert.*   transformers Blip2QFormerModel
  connector.llama_proj, connector.llama_proj2
  llm.*                transformers PhiForCausalLM (separate q/k/v) + post_layernorm
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

import torch

PLACEHOLDERS = {
    "i": r"\d+",                         # layer / block index
    "p": r"weight|bias",
    "qkv": r"query|key|value",           # BERT attention projections
    "norm": r"norm1|norm2",              # EVA block norms
    "fc": r"fc1|fc2",                    # MLP layers (EVA and Phi)
    "qk": r"q|k",                        # Phi's per-head q_layernorm / k_layernorm
    "proj": r"q_proj|k_proj|v_proj|dense",
    "ab": r"A|B",                        # LoRA factors
    "rest": r".+",                       # anything: identity tables, unused subtrees
}


def canonical(name: str) -> str:
    """A parameter name without peft's wrapper segments (see module docstring)."""
    name = name.replace("base_model.model.", "", 1)
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.(lora_\w+?)\.default(?=\.|$)", r".\1", name)


# --- conversions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What a conversion may need to know about where its output goes."""
    names: tuple[str, ...]
    shapes: tuple[torch.Size | None, ...]   # our shapes (None: no such parameter)
    llm_heads: int | None                   # attention heads of the LLM (fused qkv split)


def split_fused_qkv(tensor: torch.Tensor, target: Target) -> tuple[torch.Tensor, ...]:
    """Fused `query_key_value` rows (weight, bias or LoRA B) -> q, k, v rows.

    The original's Phi (transformers 4.36, Bloom-style `_split_heads`) views the fused output
    as (heads, 3, head_dim): rows run q_0 k_0 v_0 q_1 k_1 v_1 ... per head. (That is why
    transformers' 4.36 converter permuted MixFormer's Wqkv from (3, heads, d) to (heads, 3, d).)
    q_proj takes every head's q rows in head order, and so on.
    """
    heads = target.llm_heads
    rows = tensor.shape[0]
    if not heads or rows % (3 * heads):
        raise ValueError(f"cannot split {rows} fused qkv rows into q/k/v for {heads} heads")
    per_head = tensor.reshape(heads, 3, rows // (3 * heads), *tensor.shape[1:])
    return tuple(per_head[:, j].reshape(rows // 3, *tensor.shape[1:]) for j in range(3))


def share_lora_A(tensor: torch.Tensor, target: Target) -> tuple[torch.Tensor, ...]:
    """A LoRA on the fused projection adds B @ A x; splitting B's rows per projection gives
    three LoRAs with the same A, exactly (dropout aside, which differs only in training)."""
    return tensor, tensor, tensor


def resample_pos_embed(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    """EVA's absolute position embedding (1, 1 + g*g, width) to our grid, bicubic, as LAVIS's
    `interpolate_pos_embed` does (224 px -> 16x16 grid; 448 px -> 32x32)."""
    shape = target.shapes[0]
    if shape is None or tuple(shape) == tuple(tensor.shape):
        return tensor
    from timm.layers import resample_abs_pos_embed
    old_grid, new_grid = math.isqrt(tensor.shape[1] - 1), math.isqrt(shape[1] - 1)
    resized = resample_abs_pos_embed(tensor.float(), new_size=[new_grid, new_grid], old_size=[old_grid, old_grid],
                                     num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return resized.to(tensor.dtype)


# --- rules and tables --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    source: str
    targets: tuple[str, ...]
    convert: Callable[[torch.Tensor, Target], torch.Tensor | tuple[torch.Tensor, ...]] | None = None
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "pattern", _compile(self.source))


@dataclass(frozen=True)
class Unused:
    source: str
    reason: str
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "pattern", _compile(self.source))


def rule(source: str, target: str | tuple[str, ...] | None = None, convert=None) -> Rule:
    """`rule("a.{i}.b")` keeps the name; `rule(theirs, ours)`; a tuple of ours splits one tensor."""
    targets = (source,) if target is None else (target,) if isinstance(target, str) else tuple(target)
    return Rule(source, targets, convert)


def _compile(source: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", source)  # literal, name, literal, name, ...
    regex = "".join(re.escape(part) if k % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})"
                    for k, part in enumerate(parts))
    return re.compile(f"^{regex}$")


def prefixed(theirs: str, ours: str, entries: Iterable[Rule | Unused]) -> tuple[Rule | Unused, ...]:
    """The same rules under a parent module on each side."""
    out = []
    for entry in entries:
        if isinstance(entry, Rule):
            out.append(Rule(theirs + entry.source, tuple(ours + t for t in entry.targets), entry.convert))
        else:
            out.append(Unused(theirs + entry.source, entry.reason))
    return tuple(out)


@dataclass(frozen=True)
class Mapped:
    rule: Rule
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Skipped:
    reason: str


@dataclass(frozen=True)
class KeyTable:
    """`rules` and `unused` match the file's names; `kept` matches OUR names: parameters a file in
    this format never holds by design, which keep their pretrained (or initial) value."""
    name: str
    rules: tuple[Rule, ...]
    unused: tuple[Unused, ...] = ()
    kept: tuple[Unused, ...] = ()

    def match(self, key: str, ours: Container[str] | None = None) -> Mapped | Skipped | None:
        """The first rule matching canonical `key` (with `ours`, our canonical names: the first
        whose targets all exist there, if any does), then the unused list; None: unknown key."""
        first = None
        for r in self.rules:
            found = r.pattern.match(key)
            if found:
                mapped = Mapped(r, tuple(t.format(**found.groupdict()) for t in r.targets))
                if ours is None or all(t in ours for t in mapped.targets):
                    return mapped
                first = first or mapped
        if first is not None:
            return first
        for u in self.unused:
            if u.pattern.match(key):
                return Skipped(u.reason)
        return None

    def kept_reason(self, our_name: str) -> str | None:
        """Why this format does not hold our (canonical) parameter, if it never does."""
        return next((k.reason for k in self.kept if k.pattern.match(our_name)), None)


# --- EVA ViT-g ----------------------------------------------------------------------------------
# LAVIS `eva_vit_g.pth` (and `visual_encoder.*` in LAVIS / MiniGPT-4 model files) use the same
# names as timm's Eva; only the position embedding may need resampling.
EVA = (
    rule("cls_token"),
    rule("pos_embed", convert=resample_pos_embed),
    rule("patch_embed.proj.{p}"),
    rule("blocks.{i}.{norm}.{p}"),
    rule("blocks.{i}.attn.qkv.weight"),
    rule("blocks.{i}.attn.q_bias"),
    rule("blocks.{i}.attn.v_bias"),
    rule("blocks.{i}.attn.proj.{p}"),
    rule("blocks.{i}.mlp.{fc}.{p}"),
)
EVA_UNUSED = (
    Unused("norm.{p}", "EVA-CLIP's final norm; BLIP-2 uses its own ln_vision instead"),
    Unused("fc_norm.{p}", "EVA-CLIP's pooling norm; BLIP-2 keeps all tokens"),
    Unused("head.{p}", "EVA-CLIP's projection head; not used by BLIP-2"),
)
# Hugging Face Blip2VisionModel (`vision_model.*` in Salesforce/blip2-*): the same weights.
HF_EVA = (
    rule("embeddings.class_embedding", "cls_token"),
    rule("embeddings.position_embedding", "pos_embed", resample_pos_embed),
    rule("embeddings.patch_embedding.{p}", "patch_embed.proj.{p}"),
    rule("encoder.layers.{i}.layer_norm1.{p}", "blocks.{i}.norm1.{p}"),
    rule("encoder.layers.{i}.layer_norm2.{p}", "blocks.{i}.norm2.{p}"),
    rule("encoder.layers.{i}.self_attn.qkv.weight", "blocks.{i}.attn.qkv.weight"),
    rule("encoder.layers.{i}.self_attn.q_bias", "blocks.{i}.attn.q_bias"),
    rule("encoder.layers.{i}.self_attn.v_bias", "blocks.{i}.attn.v_bias"),
    rule("encoder.layers.{i}.self_attn.projection.{p}", "blocks.{i}.attn.proj.{p}"),
    rule("encoder.layers.{i}.mlp.{fc}.{p}", "blocks.{i}.mlp.{fc}.{p}"),
)

# --- BLIP-2 Q-Former ----------------------------------------------------------------------------
# One layer, LAVIS (BERT naming)            -> ours = Hugging Face Blip2QFormerModel naming.
# Cross-attention exists on every 2nd layer only; the rules simply match where it is present.
QFORMER_LAYER_LAVIS = (
    rule("attention.self.{qkv}.{p}",           "attention.attention.{qkv}.{p}"),
    rule("attention.output.dense.{p}"),
    rule("attention.output.LayerNorm.{p}"),
    rule("crossattention.self.{qkv}.{p}",      "crossattention.attention.{qkv}.{p}"),
    rule("crossattention.output.dense.{p}"),
    rule("crossattention.output.LayerNorm.{p}"),
    rule("intermediate_query.dense.{p}"),
    rule("output_query.dense.{p}"),
    rule("output_query.LayerNorm.{p}"),
)
QFORMER_LAYER_HF = tuple(rule(t) for r in QFORMER_LAYER_LAVIS for t in r.targets)
# The text branch: TinyGPT-V never feeds text to the Q-Former and deletes these, as does LAVIS.
QFORMER_TEXT_BRANCH = (
    Unused("embeddings.word_embeddings.weight", "Q-Former text branch (unused)"),
    Unused("embeddings.position_embeddings.weight", "Q-Former text branch (unused)"),
    Unused("embeddings.position_ids", "Q-Former text branch (unused)"),
    Unused("encoder.layer.{i}.intermediate.dense.{p}", "Q-Former text FFN (unused)"),
    Unused("encoder.layer.{i}.output.dense.{p}", "Q-Former text FFN (unused)"),
    Unused("encoder.layer.{i}.output.LayerNorm.{p}", "Q-Former text FFN (unused)"),
)
QFORMER_LAVIS = (
    rule("embeddings.LayerNorm.{p}", "layernorm.{p}"),
    *prefixed("encoder.layer.{i}.", "encoder.layer.{i}.", QFORMER_LAYER_LAVIS),
)
QFORMER_HF = (
    rule("layernorm.{p}"),
    *prefixed("encoder.layer.{i}.", "encoder.layer.{i}.", QFORMER_LAYER_HF),
)

# --- Phi-2 --------------------------------------------------------------------------------------
# transformers' PhiForCausalLM names, relative to the LM. Today's layout has q_proj/k_proj/v_proj;
# the layout the original used (transformers 4.36) fuses them into `query_key_value`, with LoRA
# on the fused layer. Both are read; ours is always today's.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PHI_LAYER = (
    # the original's fused attention input projection, and its LoRA: one adapter over q, k, v.
    # A model with `lora.fused_qkv: true` has that very adapter (first rule); a model with
    # per-projection adapters receives it split exactly (shared A, B split by rows).
    rule("self_attn.query_key_value.{p}", tuple(f"{t}.{{p}}" for t in QKV), split_fused_qkv),
    rule("self_attn.query_key_value.lora_{ab}.weight"),
    rule("self_attn.query_key_value.lora_A.weight", tuple(f"{t}.lora_A.weight" for t in QKV), share_lora_A),
    rule("self_attn.query_key_value.lora_B.weight", tuple(f"{t}.lora_B.weight" for t in QKV), split_fused_qkv),
    # today's separate projections (and `dense`, the attention output, in both), with LoRA
    rule("self_attn.{proj}.{p}"),
    rule("self_attn.{proj}.lora_{ab}.weight"),
    # TinyGPT-V's norms: per-head QK LayerNorm, post-attention RMSNorm
    rule("self_attn.{qk}_layernorm.{p}"),
    rule("post_layernorm.weight"),
    rule("input_layernorm.{p}"),
    rule("mlp.{fc}.{p}"),
    rule("mlp.{fc}.lora_{ab}.weight"),
)
PHI = (
    rule("model.embed_tokens.weight"),
    *prefixed("model.layers.{i}.", "model.layers.{i}.", PHI_LAYER),
    rule("model.final_layernorm.{p}"),
    rule("lm_head.{p}"),
)

# --- whole-model tables (targets are TinyGPTV names) ---------------------------------------------

OURS = KeyTable("tinygpt_v", tuple(
    rule(f"{part}.{{rest}}") for part in ("vision", "ln_vision", "qformer", "connector", "llm")))

# What the original's runner never writes: it saves only parameters with requires_grad, and it
# trains the norm WEIGHTS only (`base_model.init_llm`), so no norm bias is ever in its files;
# and the TinyGPT-V-main copy of its package leaves `final_layernorm.weight` untrained too.
_NEVER_TRAINED = "the original never trains it, so its checkpoints do not hold it; keeps its pretrained/initial value"
ORIGINAL_NEVER_SAVES = (
    Unused("llm.model.layers.{i}.input_layernorm.bias", _NEVER_TRAINED),
    Unused("llm.model.layers.{i}.self_attn.{qk}_layernorm.bias", _NEVER_TRAINED),
    Unused("llm.model.final_layernorm.bias", _NEVER_TRAINED),
    Unused("llm.model.final_layernorm.weight", "the TinyGPT-V-main copy of the original does not train it "
                                               "(the root copy does); keeps its pretrained value"),
)

# The original project's files: TinyGPT-V_for_Stage{1..4}.pth and runner checkpoints (trainable
# parts only), MiniGPT-4 / LAVIS BLIP-2 model files such as blip2_pretrained_flant5xxl.pth.
ORIGINAL = KeyTable(
    "original TinyGPT-V / MiniGPT-4 / LAVIS BLIP-2",
    (
        rule("llama_proj.{p}", "connector.llama_proj.{p}"),
        rule("llama_proj2.{p}", "connector.llama_proj2.{p}"),
        rule("ln_vision.{p}"),
        rule("query_tokens", "qformer.query_tokens"),
        *prefixed("Qformer.bert.", "qformer.bert.", QFORMER_LAVIS),
        *prefixed("visual_encoder.", "vision.model.", EVA),
        *prefixed("llama_model.", "llm.", PHI),
    ),
    (
        *prefixed("Qformer.bert.", "", QFORMER_TEXT_BRANCH),
        Unused("Qformer.cls.{rest}", "Q-Former language-model head (unused)"),
        *prefixed("visual_encoder.", "", EVA_UNUSED),
        Unused("t5_proj.{p}", "BLIP-2's projection into Flan-T5 (TinyGPT-V uses llama_proj)"),
        Unused("opt_proj.{p}", "BLIP-2's projection into OPT (TinyGPT-V uses llama_proj)"),
        Unused("t5_model.{rest}", "BLIP-2's Flan-T5 language model"),
        Unused("opt_model.{rest}", "BLIP-2's OPT language model"),
    ),
    ORIGINAL_NEVER_SAVES,
)

# Hugging Face Salesforce/blip2-* folders: the same frozen parts under other names.
HF_BLIP2 = KeyTable(
    "Hugging Face BLIP-2",
    (
        *prefixed("vision_model.", "vision.model.", HF_EVA),
        rule("vision_model.post_layernorm.{p}", "ln_vision.{p}"),  # BLIP-2's ln_vision
        rule("query_tokens", "qformer.query_tokens"),
        *prefixed("qformer.", "qformer.bert.", QFORMER_HF),
    ),
    (
        *prefixed("qformer.", "", QFORMER_TEXT_BRANCH),
        Unused("language_projection.{p}", "BLIP-2's projection into its own LM (TinyGPT-V uses llama_proj)"),
        Unused("language_model.{rest}", "BLIP-2's own language model (OPT / Flan-T5)"),
    ),
)

# LAVIS eva_vit_g.pth on its own.
EVA_FILE = KeyTable("LAVIS eva_vit_g", prefixed("", "vision.model.", EVA), EVA_UNUSED)

# A bare Phi-2 state dict, either layout.
PHI_FILE = KeyTable("Phi-2 (transformers layout, fused or separate q/k/v)", prefixed("", "llm.", PHI))

TABLES = (OURS, ORIGINAL, HF_BLIP2, EVA_FILE, PHI_FILE)


def pick_table(keys: Iterable[str], tables: Iterable[KeyTable] = TABLES) -> tuple[KeyTable, int]:
    """The table recognising the most of these (canonical) keys, first on ties; and how many."""
    keys = list(keys)
    scored = [(sum(table.match(k) is not None for k in keys), table) for table in tables]
    best_score = max(score for score, _ in scored)
    return next((table, score) for score, table in scored if score == best_score)


# Targets that may be absent from a shallower model without it being an error: BLIP-2 builds
# EVA with 39 of EVA-CLIP's 40 blocks, so eva_vit_g.pth's block 39 has no home.
DROPPABLE_BLOCKS = re.compile(r"^vision\.model\.blocks\.(\d+)\.")
