"""Evaluate a model on benchmarks, or re-score a predictions file (the code lives in
tinygpt_v/cli/eval.py; see its docstring).

    python eval.py --cfg-path eval_configs/benchmarks.yaml [--benchmarks gqa,vsr] [--options a.b=c ...]
    python eval.py --rescore FILE --benchmark okvqa

Installed with `pip install .`: `tinygpt-v-eval` (or `python -m tinygpt_v.cli.eval`) from any folder.
"""
import sys

from tinygpt_v.cli.eval import main, parse_args  # noqa: F401  (tests call eval.main)

if __name__ == "__main__":
    sys.exit(main())
