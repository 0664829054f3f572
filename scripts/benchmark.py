"""Speed and memory of TinyGPT-V: training, image encoding, generation.

    python scripts/benchmark.py                       # CPU: the tiny preset (what CI runs)
    python scripts/benchmark.py --model-config configs/models/tinygpt_v.yaml   # GPU: real sizes
    python scripts/benchmark.py --throughput [--skip-core]   # + the input-pipeline / fast-path ratios

`--throughput` adds scripts/benchmark_throughput.py's sections: loader samples/s by workers,
prefetch, feature cache, length grouping and the cheap wins, each beside the plain path (ratios),
and on a GPU the step time, tokens/s and MFU at each stage config's batch and image size.

Real sizes use random weights (`pretrained: null` everywhere) so no download is needed.
Each run is appended to <out>/results.json and <out>/results.md is rewritten from it, with the
device, library versions and date of every run. No assertion on speed lives in the tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

IMPORT_START = time.perf_counter()
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from tinygpt_v.models import build_model  # noqa: E402

# Dense bf16/fp16 tensor-core peak, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default=None, help="model preset (default: tiny on CPU, tinygpt_v on GPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks"), help="folder for results.json / results.md")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--text-len", type=int, default=160, help="prompt+answer text tokens per training sample")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modes", default=None, help="inference modes, e.g. fp16,bf16,int8,nf4 (default: by device)")
    p.add_argument("--note", default="", help="free text stored with the run")
    p.add_argument("--throughput", action="store_true", help="add the throughput sections (benchmark_throughput.py)")
    p.add_argument("--skip-core", action="store_true", help="only the throughput sections")
    p.add_argument("--quick", action="store_true", help="throughput sections at small sizes (tests)")
    return p.parse_args(argv)


def model_section(path: str, device: str) -> dict:
    cfg = OmegaConf.load(path).model
    for part in ("vision", "qformer", "llm"):
        if cfg.get(part) is not None and "pretrained" in cfg[part]:
            cfg[part].pretrained = None
    if cfg.tokenizer.name == "hf":  # keep it offline: a toy tokenizer, same vocabulary size bound
        cfg.tokenizer = {"name": "toy_bpe", "vocab_size": 1024}
    if device == "cpu":  # fp16 matmuls on CPU are slow and not what anyone deploys
        cfg.vision.precision, cfg.llm.dtype = "fp32", "fp32"
    return OmegaConf.to_container(cfg, resolve=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, steps: int, device: str, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def synthetic_batch(model, batch_size: int, text_len: int, image_size: int, device: str) -> dict:
    words = "the red circle is left of a blue square above two green triangles".split()
    prompt = "<Img><ImageHere></Img> " + " ".join(words[i % len(words)] for i in range(text_len // 2))
    answer = " ".join(words[(i * 3) % len(words)] for i in range(text_len // 2))
    return {"image": torch.randn(batch_size, 3, image_size, image_size, device=device),
            "prompt": [[prompt]] * batch_size, "answer": [[answer]] * batch_size}


def training_flops_per_step(model, num_tokens: int, num_images: int, image_tokens: int) -> float:
    """Model FLOPs of one step, matmuls only: the LLM runs forward (2N) and backward through its
    activations (2N) and computes weight gradients only for trainable weights (2N_train); the
    frozen vision encoder and Q-Former run forward only."""
    llm_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("llm.", "connector.")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision = sum(p.numel() for p in model.vision.parameters())
    qformer = sum(p.numel() for p in model.qformer.parameters()) if model.qformer is not None else 0
    queries = model.qformer.query_tokens.shape[1] if model.qformer is not None else 0
    return (num_tokens * (4 * llm_params + 2 * trainable)
            + num_images * (2 * vision * image_tokens + 2 * qformer * queries))


def full_logits_loss(model, batch) -> dict:
    """The naive baseline: LM-head logits at every position, as stock HF training computes."""
    embeds, mask, labels = model.prepare_training_inputs(batch["image"], batch["prompt"], batch["answer"])
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
    return {"loss": loss, "num_tokens": int(mask.sum())}


def bench_training(model, args, device: str, image_size: int, peak: float | None, naive: bool = False) -> dict:
    model.train()
    batch = synthetic_batch(model, args.train_batch, args.text_len, image_size, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    stats = {}

    def step():
        with amp:
            out = full_logits_loss(model, batch) if naive else model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.update(out)

    reset_peak(device)
    seconds = timed(step, args.steps, device)
    image_tokens = model.vision(batch["image"][:1]).shape[1]
    flops = training_flops_per_step(model, stats["num_tokens"], args.train_batch, image_tokens)
    return {"batch": args.train_batch, "tokens_per_step": stats["num_tokens"],
            "tokens_per_s": stats["num_tokens"] / seconds, "samples_per_s": args.train_batch / seconds,
            "mfu": flops / seconds / peak if peak else None, "peak_memory_gb": peak_memory_gb(device)}


@torch.no_grad()
def bench_vision(model, device: str, image_size: int, steps: int, batch: int) -> dict:
    model.eval()
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)
    seconds = timed(lambda: model.encode_image(pixels), steps, device)
    return {"image_size": image_size, "batch": batch, "images_per_s": batch / seconds}


@torch.no_grad()
def bench_generation(model, device: str, image_size: int, batch: int, new_tokens: int, **generate_kwargs) -> dict:
    """Greedy decoding with a forced length (no stop), so every run decodes `new_tokens`."""
    model.eval()
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)
    prompts = ["<Img><ImageHere></Img> Describe this image in detail."] * batch
    end_sym, model.end_sym = model.end_sym, ""
    eos, model.tokenizer.eos_token_id = model.tokenizer.eos_token_id, None
    try:
        reset_peak(device)
        first = timed(lambda: model.generate(pixels, prompts, max_new_tokens=1, **generate_kwargs), 2, device)
        full = timed(lambda: model.generate(pixels, prompts, max_new_tokens=new_tokens, **generate_kwargs), 2, device)
    finally:
        model.end_sym, model.tokenizer.eos_token_id = end_sym, eos
    return {"batch": batch, "path": "static cache" + (" + compile" if generate_kwargs.get("compile") else "")
            if generate_kwargs.get("static_cache") else "plain", "time_to_first_token_s": first,
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(full - first, 1e-9),
            "peak_memory_gb": peak_memory_gb(device)}


def bench_inference_modes(section: dict, device: str, image_size: int, modes: list[str], new_tokens: int) -> list:
    """Batch-1 generation speed and peak memory of the whole model (vision + Q-Former + LLM)
    in each low-memory mode of the inference settings, each on a freshly built model."""
    from tinygpt_v.inference.loading import prepare_model
    from tinygpt_v.inference.settings import InferenceSettings
    rows = []
    for mode in modes:
        precision, quantization = (mode, None) if mode in ("fp32", "fp16", "bf16") else ("fp16", mode)
        if device == "cpu" and precision == "fp16":
            precision = "fp32"  # bitsandbytes on CPU computes in fp32/bf16
        torch.manual_seed(0)
        model = build_model(section, verbose=False)
        settings = InferenceSettings(device=device, precision=precision, quantization=quantization,
                                     vision_precision=precision)
        model = prepare_model(model, settings)
        row = bench_generation(model, device, image_size, 1, new_tokens)
        rows.append({"mode": mode, **row})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def environment(device: str) -> dict:
    import peft
    import timm
    import transformers
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.skip_core:
        return run_throughput_only(args, device)
    config = args.model_config or str(REPO / "configs/models" / ("tinygpt_v.yaml" if device == "cuda" else "tiny.yaml"))
    args.train_batch = args.train_batch or (16 if device == "cuda" else 4)
    args.steps = args.steps or (10 if device == "cuda" else 3)
    section = model_section(config, device)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(section, verbose=False)  # the first build also trains a toy tokenizer, if any
    build_seconds = time.perf_counter() - start
    import_seconds = start - IMPORT_START
    model.to(device)
    image_size = section["vision"]["image_size"]
    peak = next((v for k, v in PEAK_FLOPS.items() if k in environment(device)["device"]), None)
    result = {"config": str(Path(config).relative_to(REPO)) if Path(config).is_relative_to(REPO) else config,
              **environment(device), "note": args.note, "build_seconds": build_seconds,
              "llm_dtype": section["llm"]["dtype"],
              "import_seconds": import_seconds,
              "training": bench_training(model, args, device, image_size, peak),
              "training_naive": bench_training(model, args, device, image_size, peak, naive=True),
              "vision": [bench_vision(model, device, s, args.steps, 8) for s in sorted({image_size, 2 * image_size})
                         if _pos_embed_fits(model, s)],
              "generation": [bench_generation(model, device, image_size, b, args.new_tokens) for b in (1, 8)]}
    result["generation"].append(bench_generation(model, device, image_size, 1, args.new_tokens, static_cache=True,
                                                 compile=device == "cuda"))
    del model
    modes = args.modes.split(",") if args.modes else (["fp16", "bf16", "int8", "nf4"] if device == "cuda"
                                                      else ["fp32", "bf16"])
    result["inference_modes"] = bench_inference_modes(section, device, image_size, modes, args.new_tokens)
    if args.throughput:
        result["throughput"] = throughput_sections(args, device)
    return result


def throughput_sections(args, device: str) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_throughput
    peak = next((v for k, v in PEAK_FLOPS.items() if k in environment(device)["device"]), None)
    args.train_batch = args.train_batch or 16
    args.steps = args.steps or 10
    return benchmark_throughput.run_throughput(args, bench_training, model_section, peak)


def run_throughput_only(args, device: str) -> dict:
    return {"config": "configs/models/tiny.yaml", **environment(device), "note": args.note,
            "throughput": throughput_sections(args, device)}


def _pos_embed_fits(model, size: int) -> bool:
    return model.vision.image_size in (None, size)  # a fixed-grid encoder only runs at its own size


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "results.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    runs.insert(0, result)
    runs_file.write_text(json.dumps(runs, indent=2) + "\n")
    (out / "results.md").write_text(markdown(runs))


def markdown(runs: list[dict]) -> str:
    lines = ["# Benchmark results", "", "Written by `scripts/benchmark.py`; newest run first. Peak memory is CUDA's",
             "max allocated on a GPU, and the process's peak RSS so far on a CPU (so it only grows within a run).",
             "Model FLOPs for MFU: LLM forward + activation backward (4N per token) + weight gradients of the",
             "trainable parameters (2N_trainable) + frozen vision/Q-Former forward; attention scores not counted.", "",
             "Throughput rows (`--throughput`, scripts/benchmark_throughput.py): each fast path beside the plain one",
             "in the same run; a ratio above 1 means the fast path is faster. The loader reads toy scenes saved as",
             "500-700 px JPEGs; step times are the tiny model's. Not measurable on a CPU: the removed host syncs",
             "(token counts from the host copies, no gradient norm on unlogged steps when max_grad_norm is null) and",
             "pinned non-blocking copies. The other cheap wins are in benchmarks/memory.md: gelu_pytorch_tanh and",
             "use_cache=False take the stage-1 estimate from 44.35 to 26.20 GB (before gradient checkpointing).", ""]
    for r in runs:
        lines += [f"## {r['date']} · {r['device']} · {r['config']}", "",
                  f"torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}, timm {r['timm']}, "
                  f"python {r['python']}, {r['threads']} CPU threads. {r.get('note', '')}", "",
                  "| measure | value |", "|---|---|"]
        if "training" not in r:  # --skip-core
            lines += _throughput_rows(r) + [""]
            continue
        t, naive = r["training"], r.get("training_naive")
        lines += [f"| model build (s), after imports | {r['build_seconds']:.2f} |",
                  f"| imports: torch, transformers, peft, timm (s) | {r.get('import_seconds', float('nan')):.2f} |",
                  f"| train: batch x tokens/step | {t['batch']} x {t['tokens_per_step'] // t['batch']} |"]
        for label, row in (("train", t), ("train, naive baseline (full logits)", naive)):
            if row:
                lines += [f"| {label}: tokens/s | {row['tokens_per_s']:,.0f} |",
                          f"| {label}: samples/s | {row['samples_per_s']:.2f} |",
                          f"| {label}: MFU | {_percent(row.get('mfu'))} |",
                          f"| {label}: peak memory (GiB) | {row['peak_memory_gb']:.2f} |"]
        lines += [f"| vision {v['image_size']} px: images/s | {v['images_per_s']:,.1f} |" for v in r["vision"]]
        for g in r["generation"] + r.get("inference_modes", []):
            label = f"generate batch {g['batch']}, {g.get('mode', r.get('llm_dtype', ''))} {g.get('path', 'plain')}"
            lines += [f"| {label}: time to first token (s) | {g['time_to_first_token_s']:.3f} |",
                      f"| {label}: decode tokens/s | {g['decode_tokens_per_s']:,.1f} |",
                      f"| {label}: peak memory (GiB) | {g['peak_memory_gb']:.2f} |"]
        lines += _throughput_rows(r)
        lines.append("")
    return "\n".join(lines)


def _throughput_rows(r: dict) -> list[str]:
    if "throughput" not in r:
        return []
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_throughput
    return benchmark_throughput.markdown_rows(r["throughput"])


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a (no peak FLOPs for this device)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    write_results(result, Path(args.out))
    print(markdown([result]))
    return result


if __name__ == "__main__":
    main()
