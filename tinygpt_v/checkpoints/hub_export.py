"""The Hugging Face Hub side of an export folder (see export.save_pretrained).

Next to our own `config.yaml` + `model.safetensors` + tokenizer files, an export gets:
- `config.json`: `model_type: tinygpt_v`, `architectures: [TinyGPTV]`, the LLM's full config as
  `text_config` (a Phi config transformers reads), and the vision / Q-Former / connector / LoRA
  settings. `AutoConfig.from_pretrained(folder)` reads it once tinygpt_v is imported (this module
  registers `TinyGPTVConfig`); without tinygpt_v it is plain JSON.
- `generation_config.json`: the stage-4 chat's decoding (greedy, 300 new tokens, repetition
  penalty 1.05) and the tokenizer's special token ids.
- `adapter_config.json` when the LoRA adapters are kept unmerged (their weights are in
  model.safetensors under our names): `peft.PeftConfig.from_pretrained(folder)` reads it.
- `README.md`: a model card (architecture, training stages, measured scores if given, licences).
`push_to_hub(folder, "org/name")` uploads the folder with huggingface_hub (`HfApi.upload_folder`);
the folder is also ready for `hf upload org/name <folder>`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from .files import CheckpointError, write_text_atomic

MODEL_TYPE = "tinygpt_v"
ARCHITECTURE = "TinyGPTV"
# The stage-4 chat's decoding (eval_configs/chat_stage4.yaml, inference.generation).
CHAT_GENERATION = {"max_new_tokens": 300, "do_sample": False, "num_beams": 1, "repetition_penalty": 1.05}
LICENCES = (
    ("EVA ViT-g/14 vision encoder", "weights of BAAI's EVA-CLIP, distributed by Salesforce LAVIS as eva_vit_g.pth",
     "MIT (EVA, BAAI); BSD-3-Clause (LAVIS)"),
    ("BLIP-2 Q-Former, ln_vision, query tokens", "Salesforce LAVIS, blip2_pretrained_flant5xxl.pth", "BSD-3-Clause"),
    ("Phi-2 language model and tokenizer", "microsoft/phi-2", "MIT"),
    ("projection layers, LoRA adapters, TinyGPT-V norms", "TinyGPT-V (DLYuanGod/TinyGPT-V) or your training",
     "BSD-3-Clause"),
)


class TinyGPTVConfig(PretrainedConfig):
    """config.json of an exported TinyGPT-V (settings only; the model is built by tinygpt_v)."""
    model_type = MODEL_TYPE

    def __init__(self, text_config: Mapping | None = None, vision_config: Mapping | None = None,
                 qformer_config: Mapping | None = None, connector_config: Mapping | None = None,
                 lora_config: Mapping | None = None, tinygpt_v: Mapping | None = None, **kwargs):
        self.text_config = dict(text_config or {})
        self.vision_config = dict(vision_config or {})
        self.qformer_config = dict(qformer_config or {})
        self.connector_config = dict(connector_config or {})
        self.lora_config = dict(lora_config) if lora_config else None
        self.tinygpt_v = dict(tinygpt_v or {})
        super().__init__(**kwargs)


AutoConfig.register(MODEL_TYPE, TinyGPTVConfig, exist_ok=True)


# --- files ----------------------------------------------------------------------------------------

def write_hub_files(model, folder: str | os.PathLike, section: Mapping, scores: Mapping | None = None) -> None:
    """config.json, generation_config.json, adapter_config.json (LoRA kept unmerged), README.md."""
    from ..config import to_plain
    folder, section = Path(folder), to_plain(section)
    config = hub_config(model, section)
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(folder / "generation_config.json", generation_config(model.tokenizer).to_json_string())
    adapter = adapter_config(model, section)
    if adapter is not None:
        write_text_atomic(folder / "adapter_config.json", json.dumps(adapter, indent=2, sort_keys=True) + "\n")
    elif (folder / "adapter_config.json").exists():
        (folder / "adapter_config.json").unlink()
    write_model_card(folder, scores)


def hub_config(model, section: Mapping) -> dict:
    from .. import __version__
    text = model.llm.config.get_text_config().to_dict()
    for key in ("_name_or_path", "auto_map", "quantization_config", "transformers_version"):
        text.pop(key, None)
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for part in ("vision", "qformer", "connector", "llm"):
        if getattr(model, part, None) is not None:  # a model without a Q-Former has qformer = None
            counts[part] = sum(p.numel() for p in getattr(model, part).parameters())
    lora = section.get("lora")
    import transformers
    config = TinyGPTVConfig(
        text_config=text, vision_config=_settings(section.get("vision")),
        qformer_config=_settings(section.get("qformer")), connector_config=_settings(section.get("connector")),
        lora_config=_settings(lora) if lora else None,
        tinygpt_v={"version": __version__, "num_parameters": counts, "weights": "model.safetensors",
                   "config": "config.yaml", "prompt_template": section.get("prompt_template"),
                   "end_sym": section.get("end_sym"),
                   "base_model": _hub_id((section.get("llm") or {}).get("pretrained")),
                   "load": "from tinygpt_v.models import TinyGPTV; TinyGPTV.from_pretrained(<this folder>)"},
        architectures=[ARCHITECTURE])
    out = config.to_dict()
    out["transformers_version"] = transformers.__version__
    return out


def _hub_id(source) -> str | None:
    """`org/name` when the LLM came from the Hub (not a local path), for the card's base_model."""
    if isinstance(source, str) and source.count("/") == 1 and not Path(source).exists() \
            and not source.startswith((".", "/", "~")):
        return source
    return None


def _settings(part: Mapping | None) -> dict:
    """A config part without its external sources (the export holds every weight)."""
    return {k: v for k, v in dict(part or {}).items() if k not in ("pretrained", "checkpoint_path")}


def generation_config(tokenizer) -> GenerationConfig:
    ids = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return GenerationConfig(**CHAT_GENERATION, **{k: v for k, v in ids.items() if v is not None})


def adapter_config(model, section: Mapping) -> dict | None:
    """adapter_config.json as peft writes it, when model.safetensors holds LoRA A/B separately."""
    lora = section.get("lora")
    if not lora or not any(".lora_A." in name for name, _ in model.named_parameters()):
        return None
    from peft import LoraConfig
    base = (section.get("llm") or {}).get("pretrained")
    config = LoraConfig(r=int(lora["r"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base if isinstance(base, str) else None)
    out = config.to_dict()
    out["target_modules"] = sorted(out["target_modules"])  # peft keeps a set
    out.pop("runtime_config", None)
    return json.loads(json.dumps(out, default=str))


# --- model card ---------------------------------------------------------------------------------------

def load_scores(path: str | os.PathLike) -> dict:
    """eval.py's summary.json (or any {"benchmarks": ..., "scorings": [...]}), checked."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot read the scores ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("benchmarks"), dict) \
            or not isinstance(summary.get("scorings"), list):
        raise CheckpointError(path, "not an eval.py summary.json (needs 'benchmarks' and 'scorings')")
    return summary


def write_model_card(folder: str | os.PathLike, scores: Mapping | None = None) -> Path:
    """README.md from the folder's config.json (so it can be redone without the model)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    write_text_atomic(folder / "README.md", model_card(config, scores))
    return folder / "README.md"


def model_card(config: Mapping, scores: Mapping | None = None) -> str:
    text, vision, qformer = config["text_config"], config["vision_config"], config["qformer_config"]
    connector, lora, extra = config["connector_config"], config.get("lora_config"), config["tinygpt_v"]
    counts = extra.get("num_parameters", {})
    base = [f"base_model: {extra['base_model']}"] if extra.get("base_model") else []
    lines = ["---", "library_name: tinygpt_v", "pipeline_tag: image-text-to-text", "license: other",
             "license_name: mixed-mit-bsd-3-clause", *base,
             "tags: [tinygpt-v, multimodal, vision-language, phi-2, blip-2, eva-clip]", "---", "",
             "# TinyGPT-V", "",
             "A small multimodal LLM (arXiv 2312.16862): EVA ViT-g/14 image encoder, BLIP-2 Q-Former, a "
             "two-layer projection and Phi-2 with per-head QK LayerNorm, a post-attention RMSNorm and LoRA. "
             "Exported by the `tinygpt_v` package; load it with",
             "", "```python", "from tinygpt_v.models import TinyGPTV",
             "model = TinyGPTV.from_pretrained(\"<this folder or its local download>\")", "```", "",
             "## Architecture", "", "| part | settings | parameters |", "|---|---|---:|",
             f"| vision encoder | EVA ViT-g: width {vision.get('width')}, depth {vision.get('depth')}, "
             f"{vision.get('heads')} heads, patch {vision.get('patch_size')}, {vision.get('image_size')} px | "
             f"{_count(counts.get('vision'))} |",
             f"| Q-Former | {qformer.get('num_layers')} layers, hidden {qformer.get('hidden_size')}, "
             f"{qformer.get('num_query_tokens')} query tokens | {_count(counts.get('qformer'))} |",
             f"| projection | {connector.get('name')}, hidden {connector.get('hidden')} | "
             f"{_count(counts.get('connector'))} |",
             f"| language model | {text.get('model_type')}: hidden {text.get('hidden_size')}, "
             f"{text.get('num_hidden_layers')} layers, {text.get('num_attention_heads')} heads, vocabulary "
             f"{text.get('vocab_size')}, QK LayerNorm {text.get('qk_layernorm')} | {_count(counts.get('llm'))} |",
             f"| total | | {_count(counts.get('total'))} |", ""]
    if lora:
        lines += [f"LoRA: r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, on "
                  f"{', '.join(lora.get('target_modules', []))} (fused q/k/v: {lora.get('fused_qkv')}); kept "
                  "unmerged, its weights are in model.safetensors (`...lora_A.default.weight`) and "
                  "adapter_config.json describes it. `query_key_value` is TinyGPT-V's one adapter over q, k and "
                  "v together (a module tinygpt_v adds to today's Phi).", ""]
    lines += ["Prompt template: `" + str(extra.get("prompt_template")) + "`, end of answer: `"
              + repr(extra.get("end_sym"))[1:-1] + "`.", "", *_STAGES, "", "## Scores", ""]
    lines += _scores(scores)
    lines += ["", "## Licences", "", "| part | origin | licence |", "|---|---|---|",
              *(f"| {part} | {origin} | {licence} |" for part, origin, licence in LICENCES), "",
              "Using these weights means accepting each part's licence.", ""]
    return "\n".join(lines)


_STAGES = (
    "## Training stages", "",
    "| stage | data | image size | trained |", "|---|---|---:|---|",
    "| 1 warm-up | LAION, CC3M+SBU image-caption pairs | 224 | projections, LLM norms |",
    "| 2 pre-training | the same | 224 | + LoRA |",
    "| 3 instruction | MiniGPT-4 cc_sbu_align | 224 | projections, norms, LoRA |",
    "| 4 multi-task | LLaVA, Flickr30k, RefCOCO/+/g, Visual Genome, TextCaps, VQAv2, OK-VQA, A-OKVQA, GQA, "
    "unnatural instructions | 448 | projections, norms, LoRA |",
)


def _scores(scores: Mapping | None) -> list[str]:
    if not scores:
        return ["No scores were measured for this export. Evaluate it with `python eval.py --cfg-path "
                "eval_configs/benchmarks.yaml ...` and export again with `--scores output/eval/summary.json`."]
    from ..evaluation.summary import markdown_table
    lines = [f"Measured with tinygpt_v's eval.py (model: {scores.get('model', '?')}); "
             "the official metric of each benchmark first, then the original TinyGPT-V scripts' scoring.", ""]
    return lines + markdown_table(scores["benchmarks"], list(scores["scorings"])).splitlines()


def _count(n) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


# --- upload ---------------------------------------------------------------------------------------

def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` if needed and upload the folder (huggingface_hub's upload_folder).
    Returns the commit URL."""
    from huggingface_hub import HfApi
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise CheckpointError(folder, "not an export folder (config.json and model.safetensors expected)")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message=commit_message or "Upload TinyGPT-V export",
                               ignore_patterns=[".*", "*.tmp", "*.part"])
    return str(getattr(commit, "commit_url", commit))


def finish_export(folder: str | os.PathLike, scores: Mapping | None = None, repo_id: str | None = None,
                  private: bool = False) -> None:
    """After save_pretrained: the model card with the measured scores, then the upload."""
    if scores:
        print(f"wrote {write_model_card(folder, scores)} (with the scores)")
    if repo_id:
        print(f"uploaded to {push_to_hub(folder, repo_id, private=private)}")
