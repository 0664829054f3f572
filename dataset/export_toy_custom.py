"""Write toy fine-tuning data in both custom formats: a question no demo stage trains on.

    python dataset/export_toy_custom.py --out output/demo/toy_custom

Writes `<out>/images/*.jpg`, `<out>/qa.jsonl` ({"id", "image", "question", "answer"} a line) and
`<out>/llava.json` (LLaVA conversations: the same question, then the background colour), both
with the same ids and image names relative to `<out>`, and README.json (chance and
majority-answer accuracy). Every question asks "how many corners does the <colour> shape have?"
(none / three / four). train_configs/finetune_demo.yaml fine-tunes the demo's stage-4 model on
it; see the README section "Fine-tune on your data".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygpt_v.data.toy_world import export_custom_formats  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/demo/toy_custom", help="output folder")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--images", type=int, default=400, help="pictures (one sample each)")
    parser.add_argument("--image-size", type=int, default=112, help="pixels per side of each picture")
    args = parser.parse_args(argv)
    meta = export_custom_formats(args.out, seed=args.seed, n_images=args.images, image_size=args.image_size)
    print(json.dumps(meta, indent=1))
    print(f"wrote {args.out}/qa.jsonl, {args.out}/llava.json and {args.out}/images/")


if __name__ == "__main__":
    main()
