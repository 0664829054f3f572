"""Train one stage, or a pipeline of stages.

    python train.py --cfg-path train_configs/stage1.yaml [--options run.init_lr=3e-5 ...]
    torchrun --nproc-per-node 4 train.py --cfg-path train_configs/stage2.yaml
    accelerate launch [--config_file fsdp.yaml] train.py --cfg-path train_configs/stage4.yaml
    python train.py --cfg-path train_configs/demo.yaml      # the offline demo: four toy stages + score

Installed (`pip install .`), from any folder: `tinygpt-v-train ...` or `python -m tinygpt_v.cli.train ...`;
a relative --cfg-path not under the current folder comes from the shipped configs, and the run's
outputs (`output/...`) go under the current folder.
"""
from __future__ import annotations

import argparse
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
    from tinygpt_v.cli.errors import quiet_harmless_warnings
    quiet_harmless_warnings()
    from tinygpt_v.checkpoints import CheckpointError
    from tinygpt_v.config import load_config, resolve_config_path
    from tinygpt_v.registry import ConfigError
    from tinygpt_v.training import NonFiniteLossError, ResumeError, run_pipeline, train
    from tinygpt_v.training.lock import OutputDirLocked
    from tinygpt_v.cli.errors import DISK_FULL, disk_full_line
    from tinygpt_v.training.pipeline import explain_missing_ckpt, is_pipeline_file
    try:
        cfg_path = resolve_config_path(args.cfg_path)
        if is_pipeline_file(cfg_path):
            run_pipeline(load_pipeline(cfg_path), args.options)
        else:
            train(load_config(cfg_path, args.options))
    except ConfigError as e:
        print(f"config error: {explain_missing_ckpt(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, ResumeError, OutputDirLocked, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(disk_full_line(e, "; the last complete checkpoint is intact: free space, then run again "
                                "with --options run.resume=auto"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --options run.resume=auto (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


def load_pipeline(path):
    """A pipeline file whose stage paths (relative to the current folder) may also come from the
    shipped configs, as --cfg-path does: the demo runs from any folder after `pip install .`."""
    from tinygpt_v.config import load_config, resolve_config_path, validate_config
    cfg = load_config(path, validate=False)
    stages = cfg.pipeline.get("stages") if "pipeline" in cfg else None
    if stages is not None and not isinstance(stages, str):
        cfg.pipeline.stages = [str(resolve_config_path(s)) if isinstance(s, str) else s for s in stages]
    validate_config(cfg, {"pipeline": str(path)})
    return cfg


if __name__ == "__main__":
    sys.exit(main())
