"""Peak GPU memory of a config's training step or generation, without weights or a GPU.

The full model is built from the config with every pretrained source replaced by random init,
on fake tensors (no memory, no compute), then one real training step (or one generation) runs
on them while `StorageTracker` counts the live device storages; see `session.py`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from .session import FakeSession
from .steps import make_optimizer, tag_optimizer_state, train_step, warm_optimizer, watch_gradients
from .tracker import CATEGORIES

GB = 1e9
INSTRUCTION_WORDS = 16  # a typical instruction / question in templated stages
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Estimate:
    name: str
    kind: str                       # "train" or "generate"
    peak_bytes: int                 # max_memory_allocated(), including resident_bytes
    breakdown: dict[str, int]       # CATEGORIES at the peak
    phase: str                      # where the peak happened
    setting: dict = field(default_factory=dict)  # batch size, image size, tokens, ...
    resident_bytes: int = 0         # allocated before the run (the validation workloads' EVA)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_gb": round(self.peak_gb, 3)}


def finish(session: FakeSession, name: str, kind: str, setting: dict, resident: int = 0) -> Estimate:
    tracker = session.tracker
    return Estimate(name, kind, tracker.peak_total + resident, dict(tracker.peak), tracker.peak_phase,
                    setting, resident)


# --- configs -> a model on fake tensors ------------------------------------------------------

def random_init_model_section(model_cfg: dict) -> dict:
    """The `model:` section with pretrained weights, checkpoints and the hub tokenizer removed."""
    cfg = copy.deepcopy(model_cfg)
    for part in ("vision", "qformer", "llm"):
        if cfg.get(part):
            cfg[part]["pretrained"] = None
            cfg[part].pop("checkpoint_path", None)
            cfg[part].pop("quantization", None)
    cfg.pop("ckpt", None)
    cfg["tokenizer"] = {"name": "toy_bpe"}  # replaced by word_tokenizer() after building
    return cfg


def word_tokenizer():
    """One token per word or punctuation run, Phi-2's special token: prompts of a known length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = "<|endoftext|>"
    tok = Tokenizer(models.WordLevel({special: 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special,
                                   unk_token="[UNK]")


def build_meta_model(model_cfg: dict, gradient_checkpointing: bool = False):
    """The config's model with random init on the meta device (see session.py)."""
    from ..models import build_model
    with torch.device("meta"):
        model = build_model(random_init_model_section(model_cfg), verbose=False)
    model.tokenizer = word_tokenizer()
    if gradient_checkpointing:
        from ..training.trainer import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    return model


# --- the text of a sample --------------------------------------------------------------------

def prompt_for(template: str, instruction_words: int) -> str:
    """Stages without a template see the image alone; the others `<Img><ImageHere></Img> question`."""
    if template == "{}" and instruction_words == 0:
        return "<ImageHere>"
    return "<Img><ImageHere></Img> " + " ".join(["word"] * instruction_words)


def default_instruction_words(template: str) -> int:
    return 0 if template == "{}" else INSTRUCTION_WORDS


def sample_text(model, text_tokens: int | None, n_image: int) -> tuple[str, str, int]:
    """(prompt, answer, text tokens) so that a sample has `text_tokens` non-image tokens
    (default: the longest single turn the config allows: max_txt_len answer tokens)."""
    words = default_instruction_words(model.prompt_template)
    longest_answer = " ".join(["word"] * (model.max_txt_len + 8))  # cut at max_txt_len
    base = len(model.build_sequence([prompt_for(model.prompt_template, words)], [""], n_image).ids) - n_image
    full = len(model.build_sequence([prompt_for(model.prompt_template, words)], [longest_answer], n_image).ids) - n_image
    target = full if text_tokens is None else text_tokens
    answer_words = max(0, min(target - base, full - base))
    answer = " ".join(["word"] * answer_words)
    words += max(0, target - base - answer_words)  # longer than one answer allows: a longer prompt
    for _ in range(3):  # the prompt's wrapper (<Img></Img>) may add tokens: settle on the length
        prompt = prompt_for(model.prompt_template, words)
        length = len(model.build_sequence([prompt], [answer], n_image).ids) - n_image
        if length <= target or words == 0:
            break
        words = max(0, words - (length - target))
    return prompt, answer, length


# --- training ---------------------------------------------------------------------------------

def batch_sizes(cfg: dict) -> list[int]:
    """The distinct per-dataset batch sizes of a training config, largest first."""
    sizes = {int(d.get("batch_size", 1)) for d in (cfg.get("datasets") or {}).values()}
    return sorted(sizes or {1}, reverse=True)


def estimate_training(cfg: dict, name: str = "train", text_tokens: int | None = None,
                      batch_size: int | None = None, kv_cache_in_training: bool = False) -> list[Estimate]:
    """One steady-state training step per distinct batch size (or just `batch_size`).
    `kv_cache_in_training` makes the training forward build a KV cache (as it did before
    `target_logits` passed use_cache=False), to compare the two."""
    from ..training.optim import parameter_groups
    from ..training.settings import read_run_settings
    run = read_run_settings(cfg.get("run"))
    model = build_meta_model(cfg["model"], run.gradient_checkpointing)
    if kv_cache_in_training:
        model.llm.get_base_model().get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "use_cache": True}), with_kwargs=True)
    with FakeSession() as session:
        session.materialize(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer([g for g in parameter_groups(model, run.weight_decay) if g["params"]],
                                   run.init_lr, run.weight_decay)
        watch_gradients(session, params)
        warm_optimizer(session, optimizer, params)
        image_size = model.vision.image_size
        n_image = model.num_image_tokens(torch.empty(1, 3, image_size, image_size))
        estimates = []
        for size in ([batch_size] if batch_size else batch_sizes(cfg)):
            prompt, answer, length = sample_text(model, text_tokens, n_image)
            batch = {"image": torch.empty(size, 3, image_size, image_size),
                     "prompt": [[prompt]] * size, "answer": [[answer]] * size}
            session.tracker.reset_peak()
            train_step(session, lambda: model(batch)["loss"], params, optimizer, run.mixed_precision,
                       run.max_grad_norm)
            del batch
            tag_optimizer_state(session, optimizer)
            estimates.append(finish(session, name, "train", {
                "batch_size": size, "image_size": image_size, "text_tokens": length,
                "sequence_length": length + n_image, "gradient_checkpointing": run.gradient_checkpointing,
                "mixed_precision": run.mixed_precision, "accum_grad_iters": run.accum_grad_iters,
                "trainable_parameters": sum(p.numel() for p in params)}))
    return estimates


# --- generation -------------------------------------------------------------------------------

def inference_setting(cfg: dict) -> dict:
    """Batch size, new tokens, image size, precision, quantisation, vision placement of an
    eval (`evaluation:`) or chat (`inference:`) config, as a GPU run would resolve them."""
    from ..inference.settings import read_inference_settings
    settings = read_inference_settings(cfg.get("inference"))
    evaluation = cfg.get("evaluation") or {}
    precision = "fp16" if settings.precision == "auto" else settings.precision
    vision_precision = "fp16" if settings.vision_precision == "auto" else settings.vision_precision
    return {
        "batch_size": int(evaluation.get("batch_size", 1)),
        "max_new_tokens": int(evaluation.get("max_new_tokens", settings.generation_settings.max_new_tokens)),
        "image_size": int(evaluation.get("image_size") or settings.image_size or cfg["model"]["vision"]["image_size"]),
        "precision": precision, "quantization": settings.quantization,
        "vision_on_cpu": settings.vision_device == "cpu", "vision_precision": vision_precision,
        "merge_lora": settings.merge_lora,
    }


def place_for_inference(model, setting: dict) -> None:
    """What `tinygpt_v.inference.prepare_model` does on a GPU: LLM in `precision` (LoRA merged)
    or quantised, Q-Former / ln_vision / connector fp32, vision tower in its precision or on the CPU."""
    from ..inference.loading import merged_llm
    from .quantized import quantize_linears
    dtype = PRECISIONS[setting["precision"]]
    llm = merged_llm(model.llm) if setting["merge_lora"] or setting["quantization"] else model.llm
    model.llm = llm.to(dtype)
    if setting["quantization"]:
        quantize_linears(model.llm, setting["quantization"], dtype)
    for part in (model.ln_vision, model.qformer, model.connector):
        if part is not None:
            part.float()
    vision_dtype = PRECISIONS[setting["vision_precision"]]
    if hasattr(model.vision, "set_precision"):  # matmul weights only, as prepare_model
        model.vision.set_precision(vision_dtype)
    else:
        model.vision.to(vision_dtype)
    model.eval()


def estimate_generation(cfg: dict, name: str = "generate", text_tokens: int | None = None,
                        batch_size: int | None = None, max_new_tokens: int | None = None) -> Estimate:
    from .steps import greedy_generate
    setting = inference_setting(cfg)
    setting["batch_size"] = batch_size or setting["batch_size"]
    setting["max_new_tokens"] = max_new_tokens or setting["max_new_tokens"]
    model_cfg = copy.deepcopy(cfg["model"])
    model_cfg["vision"]["image_size"] = setting["image_size"]
    model = build_meta_model(model_cfg)
    with torch.device("meta"):
        place_for_inference(model, setting)
    with FakeSession() as session:
        session.materialize(model)
        if setting["vision_on_cpu"]:
            for t in [*model.vision.parameters(), *model.vision.buffers()]:
                session.tracker.retag(t, "host")
            session.tracker.reset_peak()  # the tower was counted on the GPU for a moment
        size, image_size = setting["batch_size"], setting["image_size"]
        n_image = model.num_image_tokens(torch.empty(1, 3, image_size, image_size)) if model.qformer is not None else None
        words = default_instruction_words(model.prompt_template)
        if text_tokens is not None:  # prompt text tokens (all but the image embeddings)
            empty = len(model.build_sequence([prompt_for(model.prompt_template, 0)], None, n_image or 0).ids)
            words = max(0, text_tokens - (empty - (n_image or 0)))
        prompt = prompt_for(model.prompt_template, words)
        seqs = [model.build_sequence([prompt], None, n_image or 0) for _ in range(size)]
        with torch.no_grad(), session.tracker.phase_label("generate"):
            with session.tracker.on_host() if setting["vision_on_cpu"] else _nothing():
                pixels = torch.empty(size, 3, image_size, image_size)
            embeds, mask, _ = model._embed(seqs, pixels, left_pad=True)
            del pixels
            greedy_generate(model.llm, embeds, mask, setting["max_new_tokens"])
        setting.update(prompt_tokens=len(seqs[0].ids))
        return finish(session, name, "generate", setting)


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def estimate_config(cfg, name: str = "config", text_tokens: int | None = None, batch_size: int | None = None,
                    max_new_tokens: int | None = None, kv_cache_in_training: bool = False) -> list[Estimate]:
    """Training configs (with `run:` and `datasets:`) -> one estimate per batch size;
    evaluation / chat configs -> one generation."""
    from ..config import to_plain
    cfg = to_plain(cfg)
    if cfg.get("run") and cfg.get("datasets"):
        return estimate_training(cfg, name, text_tokens, batch_size, kv_cache_in_training)
    return [estimate_generation(cfg, name, text_tokens, batch_size, max_new_tokens)]


def format_estimates(estimates: list[Estimate]) -> str:
    """A plain-text table: one row per estimate, the categories at its peak."""
    head = ["run", "setting", "peak GB", *CATEGORIES, "resident", "peak during"]
    rows = [head]
    for e in estimates:
        s = e.setting
        setting = (f"batch {s['batch_size']} x {s.get('sequence_length', s.get('prompt_tokens', '?'))} tok, "
                   f"{s.get('image_size', '-')} px")
        rows.append([e.name, setting, f"{e.peak_gb:.2f}", *[f"{e.breakdown[c] / GB:.2f}" for c in CATEGORIES],
                     f"{e.resident_bytes / GB:.2f}", e.phase])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
