"""Train one stage, or a pipeline of stages (the code lives in tinygpt_v/cli/train.py).

    python train.py --cfg-path train_configs/stage1.yaml [--options run.init_lr=3e-5 ...]
    torchrun --nproc-per-node 4 train.py --cfg-path train_configs/stage2.yaml
    accelerate launch [--config_file fsdp.yaml] train.py --cfg-path train_configs/stage4.yaml
    python train.py --cfg-path train_configs/demo.yaml      # the offline demo: four toy stages + score

Installed with `pip install .`: `tinygpt-v-train` (or `python -m tinygpt_v.cli.train`) from any folder.
"""
import sys

from tinygpt_v.cli.train import main, parse_args  # noqa: F401  (tests call train.main)

if __name__ == "__main__":
    sys.exit(main())
