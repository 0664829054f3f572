"""Train one stage, or a pipeline of stages.

    python train.py --cfg-path train_configs/stage1.yaml [--options run.init_lr=3e-5 ...]
    torchrun --nproc-per-node 4 train.py --cfg-path train_configs/stage2.yaml
    accelerate launch [--config_file fsdp.yaml] train.py --cfg-path train_configs/stage4.yaml
    python train.py --cfg-path train_configs/demo.yaml      # the offline demo: four toy stages + score
"""
from __future__ import annotations

import argparse
import errno
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train TinyGPT-V (one stage config, or a pipeline file).")
    parser.add_argument("--cfg-path", required=True, help="a stage config (model/datasets/run) or a pipeline file")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.init_lr=3e-5 model.lora.r=32 (applied to every stage of a pipeline)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train; every expected failure ends in one line on stderr and a non-zero exit status:
    2 for a config error, 1 for anything else the run could not get past."""
    args = parse_args(argv)
    from tinygpt_v.checkpoints import CheckpointError
    from tinygpt_v.config import load_config
    from tinygpt_v.registry import ConfigError
    from tinygpt_v.training import NonFiniteLossError, ResumeError, run_pipeline, train
    from tinygpt_v.training.lock import OutputDirLocked
    from tinygpt_v.training.pipeline import explain_missing_ckpt, is_pipeline_file
    try:
        if is_pipeline_file(args.cfg_path):
            run_pipeline(load_config(args.cfg_path), args.options)
        else:
            train(load_config(args.cfg_path, args.options))
    except ConfigError as e:
        print(f"config error: {explain_missing_ckpt(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, ResumeError, OutputDirLocked, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full{where} ({e.strerror}); the last complete checkpoint is intact: free "
              f"space, then run again with --options run.resume=auto", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --options run.resume=auto (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
