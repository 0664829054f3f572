"""Phi-2 in any of its published layouts, loaded as today's transformers layout with no manual step.

Three layouts of the same weights exist (issues #10, #11, #26 of the original: a Phi-2 folder in
the layout the code does not expect loads with random attention weights and answers "the the"):

- `today`:   transformers >= 4.37 `PhiForCausalLM` (microsoft/phi-2 since January 2024):
             `model.layers.{i}.self_attn.{q,k,v}_proj`, `...self_attn.dense`.
- `fused`:   transformers 4.36's `PhiForCausalLM`, which the original's modeling_phi.py copies
             (and the Phi-2 copy its README points to): one `self_attn.query_key_value` whose
             output rows run per head q_0 k_0 v_0 q_1 ... (Bloom's `_split_heads`).
- `msft`:    Phi-2's first release (December 2023, `model_type: phi-msft`, remote code):
             `transformer.embd.wte`, `transformer.h.{i}.ln|mixer.Wqkv|mixer.out_proj|mlp.fc1|fc2`,
             `lm_head.ln|linear`; Wqkv rows are q (all heads), then k, then v; its config.json
             uses MixFormer's names (`n_embd`, `n_head`, `rotary_dim`, ...).

`today_layout_source(path)` detects the layout of a local folder from the weight names (the
safetensors index or headers: no tensor is read for that) and, for an old layout, converts it
once into a cached folder (`$TINYGPT_V_CACHE`, default ~/.cache/tinygpt_v) that
`AutoModelForCausalLM.from_pretrained` reads. Hub ids and folders in today's layout pass through.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .files import CheckpointError, save_safetensors_atomic

TODAY, FUSED, MSFT = "today", "fused", "msft"
LAYOUT_NAMES = {TODAY: "today's split q/k/v (transformers >= 4.37)",
                FUSED: "fused query_key_value (transformers 4.36, the original's modeling_phi.py)",
                MSFT: "phi-msft (Phi-2's first release, transformer.h.{i}.mixer.Wqkv)"}
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_COPIED = (".json", ".txt", ".model")  # tokenizer, generation config (not weights, not config.json)


# --- detection ------------------------------------------------------------------------------------

def weight_names(folder: str | os.PathLike) -> list[str]:
    """The parameter names a model folder holds, without reading tensors where the format allows."""
    folder = Path(folder)
    for index in _INDEX_FILES:
        if (folder / index).exists():
            try:
                return list(json.loads((folder / index).read_text())["weight_map"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(folder / index, f"not a weight index ({e})") from e
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors import safe_open
        names = []
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                names.extend(f.keys())
        return names
    if (folder / "pytorch_model.bin").exists():
        from .files import read_state_dict
        return list(read_state_dict(folder / "pytorch_model.bin"))
    raise CheckpointError(folder, "no weights found (model.safetensors, its index, or pytorch_model.bin)")


def detect_layout(folder: str | os.PathLike) -> str:
    """`today`, `fused` or `msft`, from the attention weight names (the config cannot tell
    `fused` from `today`: both say model_type phi)."""
    names = weight_names(folder)
    if any(".mixer.Wqkv." in n for n in names):
        return MSFT
    if any(".self_attn.query_key_value." in n for n in names):
        return FUSED
    if any(".self_attn.q_proj." in n for n in names):
        return TODAY
    raise CheckpointError(folder, "not a Phi model: no attention weights (q_proj, query_key_value or "
                                  f"mixer.Wqkv) among its {len(names)} parameter names")


# --- conversion --------------------------------------------------------------------------------

def today_config(config: Mapping, layout: str) -> dict:
    """config.json as today's PhiConfig reads it."""
    config = dict(config)
    for key in ("auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    if layout == MSFT:
        config = _msft_config(config)
    config.update(model_type="phi", architectures=["PhiForCausalLM"])
    return config


def _msft_config(old: Mapping) -> dict:
    """MixFormer-style names of the phi-msft config.json -> PhiConfig's."""
    try:
        hidden, heads = int(old["n_embd"]), int(old["n_head"])
        new = {"vocab_size": int(old["vocab_size"]), "hidden_size": hidden, "num_attention_heads": heads,
               "num_hidden_layers": int(old["n_layer"]),
               "intermediate_size": int(old.get("n_inner") or 4 * hidden),
               "max_position_embeddings": int(old.get("n_positions", 2048)),
               "partial_rotary_factor": int(old["rotary_dim"]) / (hidden // heads)}
    except KeyError as e:
        raise ValueError(f"phi-msft config.json lacks {e}") from e
    if old.get("n_head_kv") not in (None, heads):
        raise ValueError(f"phi-msft config.json: n_head_kv {old['n_head_kv']} != n_head {heads} is not supported")
    renamed = {"layer_norm_epsilon": "layer_norm_eps", "activation_function": "hidden_act",
               "resid_pdrop": "resid_pdrop", "embd_pdrop": "embd_pdrop", "attn_pdrop": "attention_dropout",
               "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings",
               "torch_dtype": "torch_dtype"}
    new.update({ours: old[theirs] for theirs, ours in renamed.items() if theirs in old})
    return new


def today_state(state: Mapping[str, torch.Tensor], layout: str, num_heads: int,
                source: str = "state dict") -> dict[str, torch.Tensor]:
    """A Phi state dict in `layout` -> today's PhiForCausalLM names (tensors split, never changed)."""
    if layout == TODAY:
        return dict(state)
    convert = _msft_name if layout == MSFT else _fused_name
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "rotary_emb" in key:  # buffers some old files hold; recomputed from the config
            continue
        name, qkv_split = convert(key)
        if name is None:
            raise CheckpointError(source, f"'{key}' is not a Phi-2 parameter name of the {LAYOUT_NAMES[layout]} layout")
        if qkv_split:
            parts = _split_per_head(value, num_heads) if layout == FUSED else value.chunk(3, dim=0)
            out.update({name.replace("{qkv}", proj): part.contiguous()
                        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts)})
        else:
            out[name] = value
    return out


def _split_per_head(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """Rows q_0 k_0 v_0 q_1 ... -> (q rows, k rows, v rows), each in head order."""
    rows = fused.shape[0]
    if rows % (3 * heads):
        raise ValueError(f"cannot split {rows} fused qkv rows into q/k/v for {heads} heads")
    per_head = fused.reshape(heads, 3, rows // (3 * heads), *fused.shape[1:])
    return tuple(per_head[:, j].reshape(rows // 3, *fused.shape[1:]) for j in range(3))


def _fused_name(key: str) -> tuple[str | None, bool]:
    if ".self_attn.query_key_value." in key:
        return key.replace("query_key_value", "{qkv}"), True
    return key, False


def _msft_name(key: str) -> tuple[str | None, bool]:
    """transformer.h.{i}.mixer.Wqkv.weight -> model.layers.{i}.self_attn.{qkv}.weight, etc."""
    fixed = {"transformer.embd.wte.weight": "model.embed_tokens.weight",
             "lm_head.ln.weight": "model.final_layernorm.weight", "lm_head.ln.bias": "model.final_layernorm.bias",
             "lm_head.linear.weight": "lm_head.weight", "lm_head.linear.bias": "lm_head.bias"}
    if key in fixed:
        return fixed[key], False
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["transformer", "h"] or not parts[2].isdigit():
        return None, False
    layer, rest = f"model.layers.{parts[2]}.", ".".join(parts[3:])
    inner = {"ln.": "input_layernorm.", "mixer.Wqkv.": "self_attn.{qkv}.", "mixer.out_proj.": "self_attn.dense.",
             "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for theirs, ours in inner.items():
        if rest.startswith(theirs) and rest[len(theirs):] in ("weight", "bias"):
            return layer + ours + rest[len(theirs):], theirs == "mixer.Wqkv."
    return None, False


def convert_folder(source: str | os.PathLike, out: str | os.PathLike, layout: str | None = None) -> Path:
    """An old-layout Phi folder -> a folder in today's layout (config.json, model.safetensors and
    the tokenizer / generation files), written into a temporary folder renamed into place."""
    from .files import read_state_dict
    source, out = Path(source), Path(out)
    layout = layout or detect_layout(source)
    config_file = source / "config.json"
    if not config_file.exists():
        raise CheckpointError(source, "expected a Phi-2 folder with config.json")
    try:
        config = today_config(json.loads(config_file.read_text()), layout)
    except ValueError as e:
        raise CheckpointError(config_file, str(e)) from e
    state = today_state(read_state_dict(source), layout, int(config["num_attention_heads"]), str(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_safetensors_atomic(state, tmp / "model.safetensors", {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in source.iterdir():
            if file.suffix in _COPIED and file.name != "config.json" and not file.name.endswith(".index.json"):
                shutil.copy2(file, tmp / file.name)
        (tmp / "CONVERTED_FROM.json").write_text(json.dumps({"source": str(source.resolve()), "layout": layout}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- the hook used by the LLM loader ----------------------------------------------------------------

def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None  # no readable config.json: transformers will say so


def cache_root() -> Path:
    return Path(os.environ.get("TINYGPT_V_CACHE") or Path.home() / ".cache" / "tinygpt_v")


def converted_path(source: Path) -> Path:
    """Where the conversion of `source` is cached: keyed by its path and its files' sizes and
    modification times, so a changed source is converted again."""
    key = hashlib.sha256(str(source.resolve()).encode())
    for file in sorted(source.iterdir()):
        if file.is_file():
            stat = file.stat()
            key.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "phi2_today_layout" / f"{source.name}-{key.hexdigest()[:16]}"


def today_layout_source(source: str | os.PathLike) -> str:
    """`source` itself for a hub id or a folder in today's layout; otherwise the path of its
    conversion to today's layout, made once and cached."""
    path = Path(source)
    if not path.is_dir() or _model_type(path) not in ("phi", "phi-msft"):
        return str(source)  # a hub id, or another model family: transformers reads it as it is
    layout = detect_layout(path)
    if layout == TODAY:
        return str(source)
    out = converted_path(path)
    if not (out / "model.safetensors").exists() or not (out / "config.json").exists():
        print(f"{path}: Phi-2 in the {LAYOUT_NAMES[layout]} layout; converting it once to today's layout "
              f"in {out}", file=sys.stderr)
        convert_folder(path, out, layout)
    return str(out)
