"""Batched prediction over benchmarks: sharded across processes, resumable, then scored.

Works with any model object that has `generate(images, prompts, max_new_tokens=..., do_sample=...,
num_beams=...) -> list[str]` and, for likelihood-ranked benchmarks, `score_candidates(images,
prompts, candidates) -> list[list[float]]`. Under torchrun / `accelerate launch` every process
predicts every N-th remaining sample; the main process merges the prediction files and scores.
The numbers do not depend on the number of processes: scores are computed from the merged
predictions, in sample order.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm import tqdm

from .benchmark import Benchmark, Sample
from .images import BadImageError, image_transform, load_image
from .loading import model_image_size
from .original import ORIGINAL_GENERATION, ORIGINAL_SCORING
from .settings import EvalSettings
from .store import PredictionStore
from .summary import write_summary


@dataclass(frozen=True)
class Generation:
    """What a prediction depends on besides the model; recorded next to the predictions."""
    batch_size: int
    max_new_tokens: int
    num_beams: int
    image_size: int
    original: bool = False  # the original's protocol: prompts as built, its generate settings (evaluation.original)

    def meta(self, model_name: str) -> dict:
        # batch_size is left out: a resumed run may use another one.
        return {"model": model_name, "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "image_size": self.image_size, **({"protocol": "original"} if self.original else {})}

    def score_kwargs(self) -> dict:
        return dict(ORIGINAL_SCORING) if self.original else {}

    def generate_kwargs(self) -> dict:
        if self.original:
            return {**ORIGINAL_GENERATION, "max_new_tokens": self.max_new_tokens}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": self.num_beams}


def evaluate(model, benchmarks: dict[str, Benchmark], settings: EvalSettings, model_name: str = "",
             state: PartialState | None = None, show_progress: bool = True) -> dict | None:
    """Predict and score every benchmark; returns the summary on the main process, None elsewhere."""
    state = state or process_state()
    output_dir = Path(settings.output_dir)
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    image_size = settings.image_size or model_image_size(model)
    if image_size is None:
        raise ValueError("set evaluation.image_size: the model does not say which image size it expects")
    transform = image_transform(image_size)
    scores = {}
    for name, benchmark in benchmarks.items():
        generation = Generation(benchmark.batch_size or settings.batch_size,
                                benchmark.max_new_tokens or settings.max_new_tokens, settings.num_beams, image_size,
                                original=getattr(benchmark, "original_protocol", False))
        samples = benchmark.samples()[:settings.limit]  # the entry's own limit applies first
        rows = predict_samples(model, samples, PredictionStore(output_dir, name), generation, transform,
                               model_name, state, show_progress)
        if state.is_main_process:
            outputs = benchmark.write_outputs(rows, str(output_dir), name)
            scores[name] = {"samples": len(rows), **({"outputs": outputs} if outputs else {}),
                            **score_rows(benchmark, rows, settings.scorings)}
    if not state.is_main_process:
        return None
    return write_summary(scores, output_dir, model_name, settings.scorings)


def score_rows(benchmark: Benchmark, rows: list[dict], scorings: list[str]) -> dict[str, dict[str, float]]:
    """{scoring: metrics} for each requested scoring the benchmark offers (GQA has no "evalai")."""
    if not benchmark.has_ground_truth():
        return {}
    return {s: benchmark.score(rows, s) for s in scorings if s in benchmark.SCORINGS}


def process_state() -> PartialState:
    """This process's place among the evaluation processes (torchrun / accelerate launch)."""
    # accelerate sets up a CPU-only multi-process run (gloo) only when asked for CPU explicitly.
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def predict_samples(model, samples: list[Sample], store: PredictionStore, generation: Generation,
                    transform: Callable, model_name: str, state: PartialState, show_progress: bool) -> list[dict]:
    """Predict the samples not yet in `store`; returns all rows (in sample order) on the main process."""
    # Every process checks (so all stop together on a mismatch) and reads what is done before
    # anything is written, or they would shard different lists.
    store.check_meta(generation.meta(model_name))
    done = store.finished(repair=state.is_main_process)
    _check_same_prompts(store.name, samples, done)
    state.wait_for_everyone()
    if state.is_main_process:
        store.record_meta(generation.meta(model_name))
    todo = [s for s in samples if s.id not in done]
    mine = todo[state.process_index::state.num_processes]
    progress = tqdm(total=len(todo), desc=store.name, disable=not (show_progress and state.is_main_process))
    with torch.inference_mode():
        for batch, images in _batches(mine, generation.batch_size, transform, device_of(model), store.name):
            rows = _predict(model, batch, images, generation)
            store.append(state.process_index, rows)
            progress.update(len(rows) * state.num_processes)  # the others advance at the same pace
    progress.close()
    state.wait_for_everyone()
    rows = store.merge([s.id for s in samples]) if state.is_main_process else []
    state.wait_for_everyone()
    return rows


def _predict(model, batch: list[Sample], images: torch.Tensor | None, generation: Generation) -> list[dict]:
    prompts = [s.prompt for s in batch]
    if batch[0].candidates is not None:
        scores = model.score_candidates(images, prompts, [list(s.candidates) for s in batch],
                                        **generation.score_kwargs())
        predictions = [s.candidates[sc.index(max(sc))] for s, sc in zip(batch, scores)]
    else:
        predictions = model.generate(images, prompts, **generation.generate_kwargs())
    if len(predictions) != len(batch):
        raise RuntimeError(f"the model returned {len(predictions)} predictions for {len(batch)} prompts")
    return [{"id": s.id, "prompt": s.prompt, "prediction": p, "target": s.target} for s, p in zip(batch, predictions)]


def _batches(samples: list[Sample], batch_size: int, transform: Callable, device: torch.device,
             benchmark: str = "") -> Iterator[tuple[list[Sample], torch.Tensor | None]]:
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        if all(s.image is None for s in batch):
            yield batch, None
            continue
        yield batch, torch.stack([_load(s, transform, benchmark) for s in batch]).to(device)


def _load(sample: Sample, transform: Callable, benchmark: str = "") -> torch.Tensor:
    if sample.image is None:
        raise ValueError(f"sample {sample.id} has no image but others in its batch do")
    try:
        return load_image(sample.image, transform)
    except BadImageError as e:  # names the file; add the benchmark and sample
        raise BadImageError(f"benchmark {benchmark}, sample {sample.id}: {e}") from None


def _check_same_prompts(name: str, samples: list[Sample], done: dict[str, dict]) -> None:
    for s in samples:
        if s.id in done and done[s.id]["prompt"] != s.prompt:
            raise ValueError(f"{name}: the stored prediction of sample {s.id} was made for another prompt "
                             f"({done[s.id]['prompt']!r}); use another output_dir or delete {name}.jsonl")


def device_of(model) -> torch.device:
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")
