"""Evaluate a model on benchmarks, or re-score an existing predictions file.

    python eval.py --cfg-path eval_configs/benchmarks.yaml [--benchmarks gqa,vsr] [--options a.b=c ...]
    torchrun --nproc_per_node 4 eval.py --cfg-path ...      # or: accelerate launch eval.py ...

Predictions go to `<evaluation.output_dir>/<benchmark>.jsonl`, the scores to summary.json and
summary.md. Re-running the same command resumes: samples already predicted are skipped.

    python eval.py --rescore FILE --benchmark okvqa [--scoring official,evalai,original] [--id-key K]

scores FILE (our predictions jsonl, lmms-eval's --log_samples jsonl, VLMEvalKit's xlsx/tsv/csv)
against the benchmark entry's own files, without loading a model (see
tinygpt_v/evaluation/rescore.py). --cfg-path defaults to eval_configs/benchmarks.yaml.

Installed (`pip install .`): `tinygpt-v-eval ...` or `python -m tinygpt_v.cli.eval ...` from any
folder. Every expected failure (a config error, a bad checkpoint or one that does not match the
model section, a bad data folder, a full disk) ends in one line on stderr: exit status 2 for a
config error, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinygpt_v.config import load_config, resolve_config_path

DEFAULT_SUITE = "eval_configs/benchmarks.yaml"  # from the current folder, else the shipped one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", help="evaluation config (YAML); required unless --rescore")
    parser.add_argument("--benchmarks", help="comma-separated entries of evaluation.benchmarks to run (default: all)")
    parser.add_argument("--options", nargs="+", default=[], help="overrides, e.g. evaluation.checkpoint=out/ckpt")
    parser.add_argument("--rescore", metavar="FILE", help="score this predictions file; no model is loaded")
    parser.add_argument("--benchmark", help="with --rescore: the evaluation.benchmarks entry FILE answers")
    parser.add_argument("--scoring", help="with --rescore: comma-separated scorings (default: evaluation.scoring)")
    parser.add_argument("--id-key", help="with --rescore: the field holding the sample id (default: question_id, "
                                         "id or index)")
    parser.add_argument("--output", help="with --rescore: also write the scores to this JSON file (a test split's "
                                         "submission file goes next to it; default: the current folder)")
    args = parser.parse_args(argv)
    if args.rescore and not args.benchmark:
        parser.error("--rescore needs --benchmark NAME (an entry of evaluation.benchmarks)")
    if not args.rescore and not args.cfg_path:
        parser.error("--cfg-path is required (unless --rescore)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinygpt_v.cli.errors import quiet_harmless_warnings
    quiet_harmless_warnings()
    from tinygpt_v.cli.errors import run_reporting
    from tinygpt_v.evaluation import BenchmarkDataError
    from tinygpt_v.evaluation.loading import ModelMismatchError
    return run_reporting(lambda: evaluate(args), expected=(FileNotFoundError, ModelMismatchError),
                         bad_input=(BenchmarkDataError,))


def evaluate(args: argparse.Namespace) -> int:
    if args.rescore:
        return rescore(args)
    options = list(args.options)
    if args.benchmarks:
        options.append(f"evaluation.select=[{args.benchmarks}]")
    from tinygpt_v.evaluation import run_evaluation
    run_evaluation(load_config(resolve_config_path(args.cfg_path), options))
    return 0


def rescore(args: argparse.Namespace) -> int:
    from tinygpt_v.evaluation.rescore import rescore_from_config
    from tinygpt_v.evaluation.summary import markdown_table
    # Only the evaluation section is used: the model section need not be loadable here.
    cfg = load_config(resolve_config_path(args.cfg_path or DEFAULT_SUITE), args.options, validate=False)
    output_dir = str(Path(args.output).parent) if args.output else "."
    result, scorings = rescore_from_config(cfg, args.benchmark, args.rescore, args.scoring, args.id_key, output_dir)
    print(markdown_table({args.benchmark: result}, scorings), end="")
    for path in result.get("outputs", []):
        print(f"wrote {path}")
    if args.output:
        Path(args.output).write_text(json.dumps({"predictions": args.rescore, "scorings": scorings,
                                                 "benchmarks": {args.benchmark: result}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
