"""Write the synthetic toy world in every on-disk format the data loaders read.

    python dataset/make_toy_data.py --out toy_data --seed 0

The generator lives in `tinygpt_v.data.toy_world` so tests and installed copies can use it;
this script is its command line. See dataset/README.md for the folder layout.
"""
from __future__ import annotations

import argparse
import json

from tinygpt_v.data.toy_world import make_toy_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="toy_data", help="output folder (default: toy_data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=120)
    parser.add_argument("--heldout-images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=112, help="pixels per side of each picture")
    args = parser.parse_args(argv)
    meta = make_toy_world(args.out, seed=args.seed, n_train=args.train_images, n_heldout=args.heldout_images,
                          image_size=args.image_size)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
