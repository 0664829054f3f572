"""Peak GPU memory of a training step or a generation, without weights and without a GPU.

    python scripts/estimate_memory.py --cfg-path train_configs/stage4.yaml
    python scripts/estimate_memory.py --cfg-path train_configs/stage1.yaml --options run.gradient_checkpointing=true
    python scripts/estimate_memory.py --cfg-path eval_configs/chat_stage4.yaml --options inference.quantization=nf4
    python scripts/estimate_memory.py --workload benchmarks/memory_workloads/train_b16_s192.yaml
    python scripts/estimate_memory.py --paper-table benchmarks   # benchmarks/memory.{json,md}

The full-size model is built with random init on fake tensors and one real training step (or
one greedy generation) runs on them while every live device storage is counted, rounded as
the CUDA caching allocator rounds it. The peak is what `torch.cuda.max_memory_allocated()`
would report; the CUDA context (~0.5 GB) and allocator caching come on top in nvidia-smi.
Training configs: one line per distinct dataset batch size. `--tokens` sets the text tokens
per sample (everything but the image embeddings); default: the config's longest single turn.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--paper-table", metavar="DIR",
                        help="estimate every paper stage and inference mode and the validation workloads; "
                             "write DIR/memory.json and DIR/memory.md")
    source.add_argument("--cfg-path", help="a train_configs/ or eval_configs/ YAML")
    source.add_argument("--workload", help="a benchmarks/memory_workloads/ YAML (validation workloads)")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, key=value")
    parser.add_argument("--tokens", type=int, help="text tokens per sample (default: the config's max lengths)")
    parser.add_argument("--batch-size", type=int, help="only this batch size (default: the config's)")
    parser.add_argument("--max-new-tokens", type=int, help="generation length (eval / chat configs)")
    parser.add_argument("--training-kv-cache", action="store_true",
                        help="the training forward builds a KV cache (the behaviour before use_cache=False)")
    parser.add_argument("--budget-gb", type=float, help="exit with status 1 when the peak exceeds this")
    parser.add_argument("--json", help="also write the estimates to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tinygpt_v.memory import estimate_config, estimate_workload, format_estimates, load_workload
    if args.paper_table:
        from tinygpt_v.memory.table import write_paper_table
        write_paper_table(ROOT, Path(args.paper_table))
        return 0
    if args.workload:
        estimates = [estimate_workload(load_workload(args.workload))]
    else:
        from tinygpt_v.config import load_config
        cfg = load_config(args.cfg_path, args.options, validate=False)  # weights and data need not exist
        estimates = estimate_config(cfg, Path(args.cfg_path).stem, args.tokens, args.batch_size, args.max_new_tokens,
                                    args.training_kv_cache)
    print(format_estimates(estimates))
    if args.json:
        Path(args.json).write_text(json.dumps([e.as_dict() for e in estimates], indent=2) + "\n")
    worst = max(e.peak_gb for e in estimates)
    if args.budget_gb is not None and worst > args.budget_gb:
        print(f"peak {worst:.2f} GB exceeds the budget of {args.budget_gb} GB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
