"""The validation workloads of issue 16 (benchmarks/memory_workloads/*.yaml): a bare Phi-2-size
LLM with LoRA and a projection, as measured on an H100, estimated the same way as the configs."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from .estimate import PRECISIONS, Estimate, finish
from .session import FakeSession
from .steps import greedy_generate, make_optimizer, tag_optimizer_state, train_step, warm_optimizer, watch_gradients
from .tracker import allocated_size

IGNORE = -100
REQUIRED = ("kind", "batch_size", "sequence_length", "llm")


def load_workload(path: str | Path) -> dict:
    spec = yaml.safe_load(Path(path).read_text())
    missing = [k for k in REQUIRED if k not in (spec or {})]
    if missing:
        raise ValueError(f"{path}: missing key '{missing[0]}' (a workload needs {', '.join(REQUIRED)})")
    if spec["kind"] not in ("train", "generate"):
        raise ValueError(f"{path}: kind: expected train or generate, got {spec['kind']!r}")
    spec.setdefault("name", Path(path).stem)
    return spec


def resident_bytes(spec: dict | None) -> int:
    """Bytes of a timm model (+ an input tensor) left on the GPU by an earlier measurement."""
    if not spec:
        return 0
    import timm
    dtype = PRECISIONS[spec.get("dtype", "fp16")]
    with torch.device("meta"):
        model = timm.create_model(spec["timm_model"], img_size=spec["image_size"], pretrained=False).to(dtype)
    tensors = [*model.parameters(), *model.buffers()]
    total = sum(allocated_size(t.numel() * t.element_size()) for t in tensors)
    if spec.get("input"):
        total += allocated_size(torch.Size(spec["input"]).numel() * dtype.itemsize)
    return total


def build_llm(spec: dict, lora: dict | None, trainable_norms: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.parameters import is_norm
    with torch.device("meta"):
        config = AutoConfig.for_model(spec["model_type"], **spec.get("config", {}))
        config._attn_implementation = spec.get("attn_implementation", "sdpa")
        llm = AutoModelForCausalLM.from_config(config, dtype=PRECISIONS[spec.get("dtype", "fp32")])
        if lora:
            from peft import LoraConfig, get_peft_model
            llm = get_peft_model(llm, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                                                 target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
        for module in llm.modules():
            if trainable_norms and is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    return llm


def build_projection(widths: list[int]) -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])


def estimate_workload(spec: dict) -> Estimate:
    resident = resident_bytes(spec.get("resident"))
    if spec["kind"] == "generate":
        return _generate(spec, resident)
    return _train(spec, resident)


def _inputs_embeds(llm, projection, batch: int, length: int, image_tokens: int):
    """32 projected image embeddings, then random text ids; labels on every text token."""
    image = projection(torch.randn(batch, image_tokens, projection[0].in_features))
    ids = torch.randint(0, llm.config.vocab_size, (batch, length - image_tokens))
    text = llm.get_input_embeddings()(ids)
    embeds = torch.cat([image.to(text.dtype), text], dim=1)
    labels = torch.cat([torch.full((batch, image_tokens), IGNORE), ids], dim=1)
    return embeds, labels


def _train(spec: dict, resident: int) -> Estimate:
    llm = build_llm(spec["llm"], spec.get("lora"), spec.get("trainable_norms", False))
    projection = build_projection(spec["projection"])
    if spec.get("gradient_checkpointing"):
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with FakeSession() as session:
        session.materialize(llm)
        session.materialize(projection)
        params = [p for m in (llm, projection) for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(params)
        watch_gradients(session, params)
        warm_optimizer(session, optimizer, params)
        llm.train()
        batch, length = spec["batch_size"], spec["sequence_length"]

        def loss():
            embeds, labels = _inputs_embeds(llm, projection, batch, length, spec.get("image_tokens", 32))
            return llm(inputs_embeds=embeds, labels=labels).loss

        session.tracker.reset_peak()
        train_step(session, loss, params, optimizer, spec.get("mixed_precision"))
        tag_optimizer_state(session, optimizer)
        return finish(session, spec["name"], "train", _setting(spec, params), resident)


def _generate(spec: dict, resident: int) -> Estimate:
    llm = build_llm(spec["llm"], None, False)
    projection = build_projection(spec["projection"])
    with FakeSession() as session:
        session.materialize(llm)
        session.materialize(projection)
        llm.eval()
        with torch.no_grad(), session.tracker.phase_label("generate"):
            embeds, _ = _inputs_embeds(llm, projection, spec["batch_size"], spec["sequence_length"],
                                       spec.get("image_tokens", 32))
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            greedy_generate(llm, embeds, mask, spec["max_new_tokens"])
        return finish(session, spec["name"], "generate", _setting(spec, []), resident)


def _setting(spec: dict, params: list) -> dict:
    return {"batch_size": spec["batch_size"], "sequence_length": spec["sequence_length"],
            "gradient_checkpointing": bool(spec.get("gradient_checkpointing")),
            "max_new_tokens": spec.get("max_new_tokens"), "measured_gb": spec.get("measured_gb"),
            "trainable_parameters": sum(p.numel() for p in params)}
