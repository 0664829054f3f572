"""Evaluate a model on benchmarks.

    python eval.py --cfg-path eval_configs/benchmarks.yaml [--benchmarks gqa,vsr] [--options a.b=c ...]
    torchrun --nproc_per_node 4 eval.py --cfg-path ...      # or: accelerate launch eval.py ...

Predictions go to `<evaluation.output_dir>/<benchmark>.jsonl`, the scores to summary.json and
summary.md. Re-running the same command resumes: samples already predicted are skipped.
"""
from __future__ import annotations

import argparse
import sys

from tinygpt_v.config import load_config
from tinygpt_v.registry import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="evaluation config (YAML)")
    parser.add_argument("--benchmarks", help="comma-separated entries of evaluation.benchmarks to run (default: all)")
    parser.add_argument("--options", nargs="+", default=[], help="overrides, e.g. evaluation.checkpoint=out/ckpt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = list(args.options)
    if args.benchmarks:
        options.append(f"evaluation.select=[{args.benchmarks}]")
    from tinygpt_v.evaluation import BenchmarkDataError, run_evaluation
    try:
        run_evaluation(load_config(args.cfg_path, options))
    except (ConfigError, BenchmarkDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
