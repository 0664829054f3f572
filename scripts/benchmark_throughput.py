"""Throughput sections of scripts/benchmark.py (`--throughput`): each fast path beside the plain one.

* loader: samples/s of the mixed loader at the stage-1 shape (batch 64, 224 px) and the stage-4
  image size (448 px) over toy-world scenes saved as 500-700 px JPEGs, for 0, 1, 2 workers;
* prefetch: training step time of the tiny model (next batch + forward + backward + update)
  with the batch loaded on demand vs workers + prefetch;
* feature cache: the tiny model's step on cached Q-Former outputs vs through the towers, and
  the full-size saving estimated from FLOPs (EVA ViT-g + Q-Former forward vs Phi-2 step);
* grouping: padding share on the stage-4 toy mix (train_configs/demo_stage4.yaml data), plain vs
  `group_by_length` on its conversation/instruction datasets;
* cheap wins: image splice loop vs vectorised (bit-identical), tokenisation outside the step,
  LoRA merged vs unmerged decode (tokens/s and the largest logit difference);
* GPU only: step time, tokens/s and MFU at each stage config's batch and image size.
"""
from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONVERSATION_DATASETS = ("llava_conversation", "llava_detail", "llava_reason", "multitask_conversation",
                         "unnatural_instruction")
# Full-size parameter counts (configs/models/tinygpt_v.yaml): EVA ViT-g/14 (39 x width 1408, MLP 6144),
# BLIP-2 Q-Former (BERT-base + cross-attention every 2nd layer), Phi-2.
EVA_G_PARAMS, QFORMER_PARAMS, PHI2_PARAMS = 0.985e9, 0.107e9, 2.78e9


# --- data --------------------------------------------------------------------------------------------

def write_realistic_images(root: Path, count: int, seed: int = 0) -> Path:
    """cc_sbu_align layout: toy scenes as 500-700 px JPEGs with sensor-like noise (so decoding
    costs what a photo of that size costs, not what a flat drawing costs)."""
    import json

    from tinygpt_v.data.toy_world import description, random_scene, render
    rng = random.Random(seed)
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations = []
    for i in range(count):
        width, height = rng.randint(500, 700), rng.randint(500, 700)
        scene = random_scene(i, rng, 600)
        picture = render(scene, 600).resize((width, height), Image.BICUBIC)
        noise = Image.effect_noise((width, height), 48).convert("RGB")
        Image.blend(picture, noise, 0.25).save(root / "image" / f"{i}.jpg", format="JPEG", quality=90)
        annotations.append({"image_id": str(i), "caption": description(scene)})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return root


def realistic_cfg(root: Path, batch: int, size: int):
    return OmegaConf.create({"cc_sbu_align": {
        "batch_size": batch, "vis_processor": {"name": "blip2_image_train", "image_size": size},
        "ann_path": str(root / "filter_cap.json"), "image_root": str(root / "image")}})


def bench_loader(root: Path, batch: int, size: int, workers: int, batches: int) -> dict:
    from tinygpt_v.data import build_train_loader
    loader = build_train_loader(realistic_cfg(root, batch, size), seed=0, num_workers=workers)
    try:
        next(loader)  # warm-up (worker start, page cache)
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            next(loader)
            times.append(time.perf_counter() - start)
    finally:
        loader.close()
    # the fastest batch: the machine is shared, and other jobs only ever slow a batch down
    return {"batch": batch, "image_size": size, "workers": workers, "samples_per_s": batch / min(times)}


# --- training steps ----------------------------------------------------------------------------------

def tiny_model(lora_dropout: float = 0.0):
    from tinygpt_v.models import build_model
    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs/models/tiny.yaml").model, resolve=True)
    section["lora"]["dropout"] = lora_dropout
    torch.manual_seed(0)
    return build_model(section, verbose=False)


def step_fn(model, cache=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch):
        out = model(cache.fill(batch) if cache else batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out
    return step


def bench_prefetch(root: Path, batch: int, steps: int) -> dict:
    """Step = next(loader) + forward/backward/update of the tiny model (112 px), on demand vs
    1 worker process + 2 batches prefetched."""
    from tinygpt_v.data import build_train_loader
    model = tiny_model().train()
    step = step_fn(model)
    rows = {}
    for _ in range(2):  # twice each, interleaved; the faster of the two (a shared machine)
        for label, workers, prefetch in (("on demand", 0, 0), ("1 worker + prefetch 2", 1, 2)):
            loader = build_train_loader(realistic_cfg(root, batch, 112), seed=0, num_workers=workers,
                                        prefetch=prefetch)
            loader.prepare = model.pretokenize
            try:
                step(next(loader))
                start = time.perf_counter()
                for _ in range(steps):
                    step(next(loader))
                rows[label] = min(rows.get(label, math.inf), (time.perf_counter() - start) / steps)
            finally:
                loader.close()
    return {"batch": batch, "steps": steps, "step_s": rows,
            "ratio": rows["on demand"] / rows["1 worker + prefetch 2"]}


def bench_feature_cache(root: Path, batch: int, steps: int) -> dict:
    """Tiny model step with the towers vs on cached features (batches collected first, so only
    the model's side differs), and the full-size estimate from FLOPs."""
    from tinygpt_v.data import build_train_loader
    from tinygpt_v.training.feature_cache import setup_input_pipeline
    model = tiny_model().train()
    with tempfile.TemporaryDirectory() as cache_dir:
        loader = build_train_loader(realistic_cfg(root, batch, 112), seed=0)

        class Run:
            feature_cache = cache_dir
        cache = setup_input_pipeline(loader, model, Run, ["projection", "llm_norms", "lora"])
        batches = [next(loader) for _ in range(steps + 1)]
        for b in batches:
            cache.fill(b)  # write every entry
        cached = [cache.lookup({k: v for k, v in b.items() if k != "image_features"}) for b in batches]
        plain = [{k: v for k, v in b.items() if k != "image_features"} for b in batches]
        loader.close()
        times = interleaved(step_fn(model), {"towers": plain, "cached features": cached})
    return {"batch": batch, "step_s": times, "ratio": times["towers"] / times["cached features"],
            "full_size_estimate": full_size_cache_estimate()}


def full_size_cache_estimate(text_tokens: int = 40, image_size: int = 224) -> dict:
    """Stage-1 step FLOPs per sample (matmuls, 2 x params x tokens per forward): frozen EVA ViT-g
    (257 tokens at 224 px) + Q-Former (32 queries) forward, vs Phi-2 over 32 image + ~40 text
    tokens, forward + activation backward (4N; the trainable projection's weight gradients are
    negligible). The cache removes the towers' share."""
    vision_tokens = (image_size // 14) ** 2 + 1
    towers = 2 * EVA_G_PARAMS * vision_tokens + 2 * QFORMER_PARAMS * 32
    llm = 4 * PHI2_PARAMS * (32 + text_tokens)
    return {"image_size": image_size, "vision_tokens": vision_tokens, "towers_gflops": towers / 1e9,
            "llm_gflops": llm / 1e9, "towers_share": towers / (towers + llm),
            "step_speedup_if_compute_bound": (towers + llm) / llm}


def interleaved(step, variants: dict[str, list]) -> dict[str, float]:
    """Median step time of each variant, their steps alternating batch by batch (so a load
    change on the shared machine hits both alike); the first batch warms up."""
    times: dict[str, list[float]] = {label: [] for label in variants}
    for i in range(len(next(iter(variants.values())))):
        for label, batches in variants.items():
            start = time.perf_counter()
            step(batches[i])
            if i:
                times[label].append(time.perf_counter() - start)
    return {label: sorted(t)[len(t) // 2] for label, t in times.items()}


# --- grouping ------------------------------------------------------------------------------------------

def stage4_toy_cfg(toy_root: Path, grouped: bool):
    from tinygpt_v.config import load_config
    data = load_config(REPO / "configs/datasets/toy_stage4.yaml", [f"paths.toy_data={toy_root}"]).datasets
    demo = OmegaConf.load(REPO / "train_configs/demo_stage4.yaml")
    data = OmegaConf.merge(data, demo.datasets)
    if grouped:
        for name in CONVERSATION_DATASETS:
            if name in data:
                data[name].group_by_length = True
    return data, demo.model


def bench_grouping(toy_root: Path, steps: int) -> dict:
    """Padding share (padded positions / all positions of the batches) over `steps` batches of
    the stage-4 toy mix, plain vs grouped, tokenised as the demo's stage 4 (template, max_txt_len)."""
    from tinygpt_v.data import build_train_loader
    model = tiny_model()
    out = {}
    for label, grouped in (("plain", False), ("grouped", True)):
        data, demo_model = stage4_toy_cfg(toy_root, grouped)
        model.prompt_template, model.max_txt_len = demo_model.prompt_template, demo_model.max_txt_len
        loader = build_train_loader(data, seed=0)
        positions = real = 0
        conv_positions = conv_real = 0
        for _ in range(steps):
            batch = next(loader)
            mask = model.training_tokens(batch["image"], batch["prompt"], batch["answer"])["attention_mask"]
            positions, real = positions + mask.numel(), real + int(mask.sum())
            if batch["dataset"][0] in CONVERSATION_DATASETS:
                conv_positions, conv_real = conv_positions + mask.numel(), conv_real + int(mask.sum())
        out[label] = {"positions": positions, "padding_share": 1 - real / positions,
                      "conversation_padding_share": 1 - conv_real / max(conv_positions, 1)}
    out["positions_saved"] = 1 - out["grouped"]["positions"] / out["plain"]["positions"]
    out["conversations_batch_8"] = conversation_padding(toy_root, model, steps)
    return out


def conversation_padding(toy_root: Path, model, steps: int, batch: int = 8) -> dict:
    """The toy conversation/instruction datasets alone at batch 8 (a fine-tuning batch; the paper's
    stage 4 uses 1-3 per dataset, where there is little to group)."""
    from tinygpt_v.data import build_train_loader
    out = {}
    for label, grouped in (("plain", False), ("grouped", True)):
        data, _ = stage4_toy_cfg(toy_root, grouped)
        data = OmegaConf.create({n: {**OmegaConf.to_container(data[n], resolve=True), "batch_size": batch}
                                 for n in CONVERSATION_DATASETS if n in data})
        loader = build_train_loader(data, seed=0)
        positions = real = 0
        for _ in range(steps):
            b = next(loader)
            mask = model.training_tokens(b["image"], b["prompt"], b["answer"])["attention_mask"]
            positions, real = positions + mask.numel(), real + int(mask.sum())
        out[label] = {"positions": positions, "padding_share": 1 - real / positions}
    out["positions_saved"] = 1 - out["grouped"]["positions"] / out["plain"]["positions"]
    return out


# --- cheap wins ---------------------------------------------------------------------------------------------

def bench_splice(batch: int = 64, text: int = 100, image_tokens: int = 32, hidden: int = 2560,
                 repeats: int = 5) -> dict:
    """The stage-1 shape: the old per-sample loop vs `splice_images`; same values?"""
    from tinygpt_v.models.tinygpt_v import splice_images
    length = text + image_tokens
    slots = torch.zeros(batch, length, dtype=torch.bool)
    slots[:, 5:5 + image_tokens] = True
    slots[0, 5 + image_tokens - 3:] = False  # a capped prompt cut part of an image
    embeds, image_embeds = torch.randn(batch, length, hidden), torch.randn(batch, image_tokens, hidden)

    def loop(e):
        for i in range(batch):
            e[i, slots[i]] = image_embeds[i, : int(slots[i].sum())]
        return e
    times = {}
    for label, fn in (("loop", loop), ("vectorised", lambda e: splice_images(e, slots, image_embeds))):
        start = time.perf_counter()
        for _ in range(repeats):
            result = fn(embeds.clone())
        times[label] = (time.perf_counter() - start) / repeats
        times[f"{label}_result"] = result
    identical = torch.equal(times.pop("loop_result"), times.pop("vectorised_result"))
    return {"shape": [batch, length, hidden], "seconds": times, "ratio": times["loop"] / times["vectorised"],
            "bit_identical": identical}


def bench_tokenisation(toy_root: Path, steps: int) -> dict:
    """Share of the tiny model's step spent tokenising (now done by the loader, ahead of the
    step), and whether the loss of a pre-tokenised batch is the same."""
    from tinygpt_v.data import build_train_loader
    data, demo_model = stage4_toy_cfg(toy_root, False)
    model = tiny_model().train()
    model.prompt_template, model.max_txt_len = demo_model.prompt_template, demo_model.max_txt_len
    loader = build_train_loader(data, seed=1)
    batches = [next(loader) for _ in range(steps)]
    start = time.perf_counter()
    tokenised = [model.pretokenize(b) for b in batches]
    tokenise_s = (time.perf_counter() - start) / steps
    times = interleaved(step_fn(model), {"tokenise in forward": batches, "pre-tokenised": tokenised})
    model.eval()
    with torch.no_grad():
        same = all(model(a)["loss"].item() == model(b)["loss"].item() for a, b in zip(batches[:5], tokenised[:5]))
    return {"tokenise_s_per_batch": tokenise_s, "step_s": times,
            "ratio": times["tokenise in forward"] / times["pre-tokenised"], "bit_identical": same}


@torch.no_grad()
def bench_lora_merge(new_tokens: int = 48) -> dict:
    """Greedy decode of the tiny model with non-zero LoRA weights, adapters unmerged vs merged."""
    from tinygpt_v.inference.loading import merged_llm
    model = tiny_model().eval()
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.02)  # as trained: B starts at zero, which would make merging trivial
    pixels = torch.randn(1, 3, 112, 112)
    prompt = ["<Img><ImageHere></Img> Describe this image in detail."]
    embeds, mask, _ = model._embed([model.build_sequence(prompt, None, model.num_image_tokens(pixels))],
                                   pixels, left_pad=True)
    logits_unmerged = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    merged = copy.deepcopy(model)
    merged.llm = merged_llm(merged.llm)
    models = {"unmerged": model, "merged": merged}
    best, texts = {k: math.inf for k in models}, {}
    for m in models.values():
        m.end_sym, m.tokenizer.eos_token_id = "", None  # a forced length: every run decodes new_tokens
        m.generate(pixels, prompt, max_new_tokens=4)
    for _ in range(5):  # alternating, best of 5: the machine is shared
        for label, m in models.items():
            start = time.perf_counter()
            texts[label] = m.generate(pixels, prompt, max_new_tokens=new_tokens)[0]
            best[label] = min(best[label], time.perf_counter() - start)
    rows = {label: {"decode_tokens_per_s": new_tokens / best[label], "text": texts[label]} for label in models}
    logits_merged = merged.llm(inputs_embeds=embeds, attention_mask=mask).logits
    return {"tokens_per_s": {k: v["decode_tokens_per_s"] for k, v in rows.items()},
            "ratio": rows["merged"]["decode_tokens_per_s"] / rows["unmerged"]["decode_tokens_per_s"],
            "same_greedy_text": rows["merged"]["text"] == rows["unmerged"]["text"],
            "max_logit_diff": float((logits_merged - logits_unmerged).abs().max())}


# --- GPU: each stage config ----------------------------------------------------------------------------------

def bench_stages_gpu(bench_training, model_section_fn, args, peak) -> list[dict]:
    """Step time, tokens/s and MFU at each stage's first dataset's batch size and image size
    (full-size model, random weights, bf16 autocast). Skipped without CUDA."""
    if not torch.cuda.is_available():
        return []
    from tinygpt_v.models import build_model
    rows = []
    for stage in (1, 2, 3, 4):
        cfg = OmegaConf.load(REPO / f"train_configs/stage{stage}.yaml")
        size = int(OmegaConf.select(cfg, "model.vision.image_size", default=224))
        first = next(iter(cfg.datasets.values()))
        section = model_section_fn(str(REPO / "configs/models/tinygpt_v.yaml"), "cuda")
        section["vision"]["image_size"] = size
        if OmegaConf.select(cfg, "model.qformer", default="keep") is None:
            section["qformer"] = None
        torch.manual_seed(0)
        model = build_model(section, verbose=False).cuda()
        batch_args = type(args)(**{**vars(args), "train_batch": int(first.batch_size)})
        row = bench_training(model, batch_args, "cuda", size, peak)
        rows.append({"stage": stage, "image_size": size, **row, "step_s": row["batch"] / row["samples_per_s"]})
        del model
        torch.cuda.empty_cache()
    return rows


# --- all of it -------------------------------------------------------------------------------------------------

def run_throughput(args, bench_training=None, model_section_fn=None, peak=None) -> dict:
    from tinygpt_v.data.toy_world import make_toy_world
    quick = getattr(args, "quick", False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_realistic_images(tmp / "realistic", 24 if quick else 160)
        make_toy_world(str(tmp / "toy"), seed=0, n_train=24 if quick else 60, n_heldout=4)
        loader_batches = 1 if quick else 3
        shapes = ((8, 224), (8, 448)) if quick else ((64, 224), (64, 448))
        result = {
            "loader": [bench_loader(images, b, s, w, loader_batches) for b, s in shapes for w in (0, 1, 2)],
            "prefetch": bench_prefetch(images, 4 if quick else 16, 2 if quick else 10),
            "feature_cache": bench_feature_cache(images, 4 if quick else 16, 2 if quick else 8),
            "grouping": bench_grouping(tmp / "toy", 20 if quick else 200),
            "splice": bench_splice(batch=8 if quick else 64, hidden=256 if quick else 2560),
            "tokenisation": bench_tokenisation(tmp / "toy", 4 if quick else 40),
            "lora_merge": bench_lora_merge(8 if quick else 48),
        }
    if bench_training is not None:
        result["stages_gpu"] = bench_stages_gpu(bench_training, model_section_fn, args, peak)
    return result


def markdown_rows(t: dict) -> list[str]:
    """Table rows (`| measure | value |`) of a run's throughput sections."""
    lines = []
    for row in t["loader"]:
        lines.append(f"| loader {row['image_size']} px, batch {row['batch']}, {row['workers']} workers: samples/s "
                     f"| {row['samples_per_s']:,.1f} |")
    base = {(r["image_size"], r["workers"]): r["samples_per_s"] for r in t["loader"]}
    for size in sorted({r["image_size"] for r in t["loader"]}):
        lines.append(f"| loader {size} px: 1 / 2 workers vs 0 | {base[size, 1] / base[size, 0]:.2f}x / "
                     f"{base[size, 2] / base[size, 0]:.2f}x |")
    p = t["prefetch"]
    lines += [f"| step (tiny, batch {p['batch']}, loading 500-700 px JPEGs), {k}: s | {v:.3f} |"
              for k, v in p["step_s"].items()]
    lines.append(f"| **prefetch vs none: step-time ratio** | **{p['ratio']:.2f}x** |")
    c = t["feature_cache"]
    lines += [f"| step (tiny, batch {c['batch']}), {k}: s | {v:.4f} |" for k, v in c["step_s"].items()]
    lines.append(f"| **feature cache vs none: step-time ratio (tiny, CPU)** | **{c['ratio']:.2f}x** |")
    e = c["full_size_estimate"]
    lines.append(f"| full size, stage 1 (FLOPs estimate): towers share of the step / speed-up if compute bound "
                 f"| {100 * e['towers_share']:.0f}% / {e['step_speedup_if_compute_bound']:.2f}x |")
    g = t["grouping"]
    lines += [f"| stage-4 toy mix, {k}: padding share of positions (conversation batches) | "
              f"{100 * g[k]['padding_share']:.1f}% ({100 * g[k]['conversation_padding_share']:.1f}%) |"
              for k in ("plain", "grouped")]
    lines.append(f"| **grouped vs plain (stage-4 toy mix, its batch sizes): positions saved** | "
                 f"**{100 * g['positions_saved']:.1f}%** |")
    c8 = g.get("conversations_batch_8")
    if c8:
        lines.append(f"| conversation datasets alone, batch 8: padding share plain / grouped; positions saved | "
                     f"{100 * c8['plain']['padding_share']:.1f}% / {100 * c8['grouped']['padding_share']:.1f}%; "
                     f"**{100 * c8['positions_saved']:.1f}%** |")
    s = t["splice"]
    lines.append(f"| image splice {s['shape']}: loop / vectorised (s) | {s['seconds']['loop']:.4f} / "
                 f"{s['seconds']['vectorised']:.4f} ({s['ratio']:.1f}x, bit-identical: {s['bit_identical']}) |")
    k = t["tokenisation"]
    lines.append(f"| tokenisation out of forward: step ratio (tokenise {1e3 * k['tokenise_s_per_batch']:.1f} ms/batch) "
                 f"| {k['ratio']:.2f}x (loss bit-identical: {k['bit_identical']}) |")
    m = t["lora_merge"]
    lines.append(f"| LoRA merged vs unmerged decode (tiny, fp32) | {m['ratio']:.2f}x (same greedy text: "
                 f"{m['same_greedy_text']}, max logit diff {m['max_logit_diff']:.1e}) |")
    for row in t.get("stages_gpu", []):
        mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| stage {row['stage']} (batch {row['batch']}, {row['image_size']} px): step s / tokens/s / MFU "
                     f"| {row['step_s']:.3f} / {row['tokens_per_s']:,.0f} / {mfu} |")
    return lines
