"""The demo's score: accuracy on the toy world's held-out VQA questions, next to chance.

Every held-out question asks the colour of a named shape on an image never trained on; the
six colours are equally likely, so chance is 1/6 (read from the toy world's README.json, with
the best image-blind baseline measured on the same questions). A prediction is right when it
equals the answer after the official VQA answer normalisation.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def toy_vqa_accuracy(model, toy_root: str, image_size: int, batch_size: int = 32, max_new_tokens: int = 5) -> dict:
    """Greedy answers to every held-out question; returns accuracy, chance and a printable line."""
    from ..data import IMAGE_PLACEHOLDER, build_processor, load_image
    from ..data.prompts import VQA
    from ..evaluation.metrics import normalize_vqa_answer

    root = Path(toy_root)
    records = json.loads((root / "heldout" / "vqa_heldout.json").read_text())
    meta = json.loads((root / "README.json").read_text())
    process = build_processor({"name": "blip2_image_eval", "image_size": image_size})
    was_training = model.training
    model.eval()
    hits, examples = 0, []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = torch.stack([process(load_image(root / "heldout" / r["image"], None)) for r in batch])
        prompts = [f"{IMAGE_PLACEHOLDER} {VQA[0].format(r['question'])}" for r in batch]
        answers = model.generate(images, prompts, max_new_tokens=max_new_tokens)
        for record, answer in zip(batch, answers):
            right = normalize_vqa_answer(answer) == normalize_vqa_answer(record["answer"][0])
            hits += right
            if len(examples) < 5:
                examples.append((record["question"], answer, record["answer"][0]))
    model.train(was_training)
    accuracy, chance = hits / len(records), meta["chance_accuracy"]
    line = (f"held-out toy VQA accuracy: {accuracy:.1%} ({hits}/{len(records)}) vs chance {chance:.1%} "
            f"({accuracy / chance:.1f}x chance; image-blind baseline {meta['blind_baseline_accuracy']:.1%})")
    return {"accuracy": accuracy, "correct": hits, "questions": len(records), "chance": chance,
            "blind_baseline": meta["blind_baseline_accuracy"], "examples": examples, "line": line}


def evaluate_checkpoint(stage_cfg, checkpoint: Path, toy_root: str) -> dict:
    """Rebuild the stage's model, load the checkpoint (trainable and random-init frozen
    parameters) and score it."""
    from accelerate.utils import set_seed

    from ..models import build_model
    from .checkpointing import load_trainable

    set_seed(int(stage_cfg.run.get("seed", 42)))
    model = build_model(stage_cfg.model, verbose=False)
    load_trainable(model, checkpoint)
    result = toy_vqa_accuracy(model, toy_root, image_size=int(stage_cfg.model.vision.image_size))
    for question, answer, truth in result["examples"]:
        print(f"  {question!r:40} -> {answer!r} (truth {truth!r})")
    return result
