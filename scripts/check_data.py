#!/usr/bin/env python
"""Check your fine-tuning data before any model is built.

    python scripts/check_data.py --cfg-path train_configs/finetune.yaml \
        --options paths.data=my_data.jsonl paths.images=my_images

For every `datasets:` entry of a custom format (llava_json, qa_jsonl; see
tinygpt_v/data/custom.py) it reads the whole file and reports: lines that are not JSON or not an
object, missing fields, empty questions or answers, `<image>` markers in the wrong place,
missing and unreadable images (each one fully decoded; --fast opens headers only, as train.py
does), samples longer than `model.max_txt_len` in the model's tokens (only the tokenizer is
built), duplicate rows and ids. It prints the counts per problem and the first bad rows with
their line numbers. train.py runs the same check when it starts and refuses a dataset whose
bad rows exceed its `max_bad_fraction`.

Exit status: 0 the data is usable (bad rows, if any, are left out), 1 a dataset would be
refused, 2 a config error (wrong path, unknown key).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CUSTOM_BUILDERS = ("llava_json", "qa_jsonl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="training config (e.g. train_configs/finetune.yaml)")
    parser.add_argument("--options", nargs="+", default=[], help="overrides, e.g. paths.data=my.jsonl")
    parser.add_argument("--fast", action="store_true", help="open image headers only (train.py's check)")
    parser.add_argument("--show", type=int, default=5, help="bad rows to print per dataset (default 5)")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the length check (no tokenizer needed)")
    return parser.parse_args(argv)


def custom_entries(datasets: dict) -> dict:
    return {name: options for name, options in datasets.items()
            if isinstance(options, dict) and options.get("builder", name) in CUSTOM_BUILDERS}


def tokenizer_or_none(model: dict, skip: bool):
    if skip or not model.get("tokenizer"):
        return None
    from tinygpt_v.data.custom import build_tokenizer
    try:
        return build_tokenizer(model)
    except Exception as e:  # a missing tokenizer folder must not hide the other checks
        print(f"warning: no length check, the tokenizer does not load: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    data_log = logging.getLogger("tinygpt_v.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # the report says it all, once; restored for in-process callers
    try:
        return check(parse_args(argv))
    finally:
        data_log.setLevel(level)


def check(args: argparse.Namespace) -> int:
    from tinygpt_v.config import load_config, to_plain
    from tinygpt_v.data import build_dataset
    from tinygpt_v.data.custom import format_reports, preflight
    from tinygpt_v.registry import ConfigError
    try:
        # not validated as a whole: the model's checkpoint need not exist to check the data
        cfg = to_plain(load_config(args.cfg_path, args.options, validate=False))
        entries = custom_entries(cfg.get("datasets") or {})
        if not entries:
            print(f"{args.cfg_path}: no dataset of a custom format ({', '.join(CUSTOM_BUILDERS)}); nothing to check")
            return 2
        datasets = {name: build_dataset(name, options) for name, options in entries.items()}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = cfg.get("model") or {}
    tokenizer = tokenizer_or_none(model, args.no_tokenizer)
    reports = preflight(datasets, tokenizer, model=model if tokenizer is not None else {}, full=not args.fast,
                        refuse=False)
    print(format_reports(reports, args.show))
    refused = [r.name for r in reports if r.refused]
    if refused:
        print(f"REFUSED: {', '.join(refused)}: mostly bad data; train.py would stop here")
        return 1
    bad = sum(r.bad_rows for r in reports)
    print(f"OK: usable{f' ({bad} bad rows will be left out or cut)' if bad else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
