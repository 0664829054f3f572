"""Evaluation: benchmarks (one module each), metrics, and the batched, resumable prediction runner.

    python eval.py --cfg-path eval_configs/benchmarks.yaml --benchmarks gqa,vsr
    python eval.py --rescore predictions.jsonl --benchmark okvqa --scoring official,evalai,original

Importing this package registers the benchmarks and the checker of the `evaluation:` section.
"""
from . import benchmarks  # noqa: F401  (registers every benchmark)
from .benchmark import Benchmark, BenchmarkDataError, Sample, clean_reply
from .benchmarks.vqa import write_submission
from .metrics import (VQA_ACCURACY, auroc, box_iou, normalize_vqa_answer, parse_grid_box, vqa_accuracy,
                      vqa_accuracy_evalai, vqa_accuracy_lenient, vqa_accuracy_official, vqa_accuracy_original)
from .rescore import rescore
from .runner import evaluate
from .settings import EvalSettings, build_benchmarks, check_evaluation, settings_from_config


def run_evaluation(cfg, show_progress: bool = True) -> dict | None:
    """Everything eval.py does: build the model and benchmarks from `cfg`, predict, score, summarise."""
    from .loading import load_model
    from .runner import process_state
    settings = settings_from_config(cfg)
    suite = build_benchmarks(settings)
    state = process_state()
    model = load_model(cfg, settings, state.device)
    return evaluate(model, suite, settings, model_name=settings.checkpoint or "(model section)",
                    state=state, show_progress=show_progress)


__all__ = ["Benchmark", "BenchmarkDataError", "EvalSettings", "Sample", "VQA_ACCURACY", "auroc", "box_iou",
           "build_benchmarks", "check_evaluation", "clean_reply", "evaluate", "normalize_vqa_answer", "parse_grid_box",
           "rescore", "run_evaluation", "settings_from_config", "vqa_accuracy", "vqa_accuracy_evalai",
           "vqa_accuracy_lenient", "vqa_accuracy_official", "vqa_accuracy_original", "write_submission"]
