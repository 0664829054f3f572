#!/usr/bin/env python
"""Convert checkpoints into TinyGPT-V's formats.

  # the original's files (and LAVIS / Hugging Face BLIP-2, EVA, Phi-2) -> one safetensors of ours,
  # checked against the model a config describes (built on the meta device: no memory, no download)
  python scripts/convert_checkpoint.py convert TinyGPT-V_for_Stage4.pth --out stage4.safetensors \
      --config configs/models/tinygpt_v.yaml --options model.vision.image_size=448

  # report what a file holds and how it maps, writing nothing
  python scripts/convert_checkpoint.py convert blip2_pretrained_flant5xxl.pth --dry-run

  # one of our checkpoints -> the original's layout (as its runner writes checkpoint_{epoch}.pth),
  # for the original's code; --peft-adapter default for peft >= 0.3 names (lora_A.default.weight)
  python scripts/convert_checkpoint.py to-original output/stage4/checkpoint_final --out stage4_original.pth

  # the original's fused query_key_value Phi-2 folder -> today's transformers layout (llm.pretrained)
  python scripts/convert_checkpoint.py phi old_phi2/ --out phi2/

  # a pickled .pth that the loaders refuse because it holds Python code or objects (they never run
  # it): only for a file you trust, unpickle it once, here, and keep its tensors as safetensors
  python scripts/convert_checkpoint.py unpickle old_model.pth --trust-pickle --out old_model.safetensors

  # a trained model (config + its pretrained sources + model.ckpt) -> self-contained folder that
  # TinyGPTV.from_pretrained(folder) loads with no other file
  python scripts/convert_checkpoint.py export --config train_configs/stage4.yaml --out tinygpt_v_stage4/ \
      --ckpt output/stage4/checkpoint_1000
  # ... with the Hugging Face files (config.json, generation_config.json, model card with the scores
  # of eval.py's summary.json), uploaded to the Hub (or upload the folder later: hf upload ORG/NAME DIR)
  python scripts/convert_checkpoint.py export --config eval_configs/chat_stage4.yaml --out tinygpt_v_stage4/ \
      --ckpt weights/TinyGPT-V_for_Stage4.pth --scores output/eval/summary.json --push-to-hub ORG/NAME
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs/models/tinygpt_v.yaml"


def model_section(config: str, options: list[str]) -> dict:
    """The `model:` section of a model preset or a full train/eval config (with its defaults)."""
    from tinygpt_v.config import load_config, to_plain
    cfg = load_config(config, options, validate=False)
    return to_plain(cfg.model)


def shape_only_model(section: dict):
    """The model with random weights on the meta device: every name and shape, no memory, no
    pretrained files; the toy tokenizer stands in (conversion never touches the tokenizer)."""
    from tinygpt_v.models import build_model
    section = dict(section, tokenizer={"name": "toy_bpe"}, ckpt=None)
    for part in ("vision", "qformer", "llm"):
        if section.get(part) and "pretrained" in section[part]:
            section[part] = dict(section[part], pretrained=None)
    with torch.device("meta"):
        return build_model(section, verbose=False)


def cmd_convert(args) -> int:
    from tinygpt_v.checkpoints import convert_to_ours, plan_load, read_state_dict
    from tinygpt_v.checkpoints.loading import llm_heads, model_parts
    model = shape_only_model(model_section(args.config, args.options))
    if args.dry_run:
        for source in args.sources:
            plan = plan_load(model, read_state_dict(source), source, parts=model_parts(model),
                             llm_heads=llm_heads(model))
            print(plan.report)
        return 0
    if not args.out:
        raise SystemExit("convert: --out is required (or --dry-run)")
    for report in convert_to_ours(model, args.sources, args.out, strict=not args.non_strict):
        print(report if args.verbose or not report.ok else report.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_to_original(args) -> int:
    from tinygpt_v.checkpoints import convert_to_original
    print(f"wrote {convert_to_original(args.source, args.out, args.peft_adapter)}")
    return 0


def cmd_phi(args) -> int:
    from tinygpt_v.checkpoints import convert_fused_phi
    print(f"wrote {convert_fused_phi(args.source, args.out)}")
    return 0


def cmd_unpickle(args) -> int:
    from tinygpt_v.checkpoints.files import convert_trusted_pickle
    if not args.trust_pickle:
        raise SystemExit("unpickle runs whatever code the file holds: add --trust-pickle if you trust where it "
                         "came from")
    print(f"wrote {convert_trusted_pickle(args.source, args.out)}")
    return 0


def cmd_export(args) -> int:
    from tinygpt_v.models import build_model
    section = model_section(args.config, args.options)
    if args.ckpt:
        section["ckpt"] = args.ckpt
    from tinygpt_v.checkpoints import hub_export
    scores = hub_export.load_scores(args.scores) if args.scores else None  # a bad file fails before the build
    model = build_model(section, verbose=False)
    model.save_pretrained(args.out, section)
    print(f"wrote {args.out}")
    hub_export.finish_export(args.out, scores, args.push_to_hub, args.private)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="foreign checkpoint(s) -> our safetensors")
    convert.add_argument("sources", nargs="+", help="files or folders, loaded in order (later ones win)")
    convert.add_argument("--out", help="output .safetensors")
    convert.add_argument("--config", default=str(DEFAULT_MODEL_CONFIG), help="model preset or full config")
    convert.add_argument("--options", nargs="*", default=[], help="overrides such as model.lora.r=64")
    convert.add_argument("--dry-run", action="store_true", help="print the load report, write nothing")
    convert.add_argument("--non-strict", action="store_true", help="write even with missing/unexpected keys")
    convert.add_argument("--verbose", action="store_true", help="print full reports")
    convert.set_defaults(run=cmd_convert)

    to_original = sub.add_parser("to-original", help="our checkpoint -> the original's runner layout (.pth)")
    to_original.add_argument("source", help="our checkpoint folder or .safetensors")
    to_original.add_argument("--out", required=True, help="output .pth")
    to_original.add_argument("--peft-adapter", default=None,
                             help="adapter name segment in LoRA keys: none (peft 0.2.0, the original's pin) "
                                  "or 'default' (later peft)")
    to_original.set_defaults(run=cmd_to_original)

    phi = sub.add_parser("phi", help="fused query_key_value Phi-2 folder -> today's transformers layout")
    phi.add_argument("source")
    phi.add_argument("--out", required=True)
    phi.set_defaults(run=cmd_phi)

    unpickle = sub.add_parser("unpickle", help="a trusted pickled checkpoint -> safetensors (runs its code!)")
    unpickle.add_argument("source")
    unpickle.add_argument("--out", required=True, help="output .safetensors")
    unpickle.add_argument("--trust-pickle", action="store_true",
                          help="required: you trust the file, since unpickling runs the code it holds")
    unpickle.set_defaults(run=cmd_unpickle)

    export = sub.add_parser("export", help="build a model from a config and write a self-contained folder")
    export.add_argument("--config", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--ckpt", nargs="*", default=None, help="checkpoints to load after building")
    export.add_argument("--options", nargs="*", default=[])
    export.add_argument("--scores", help="eval.py's summary.json: the measured scores go into the model card")
    export.add_argument("--push-to-hub", metavar="ORG/NAME",
                        help="upload the folder to this Hub repository (created if needed; token from HF_TOKEN "
                             "or `hf auth login`)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    export.set_defaults(run=cmd_export)

    args = parser.parse_args(argv)
    from tinygpt_v.checkpoints import CheckpointError
    try:
        return args.run(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
