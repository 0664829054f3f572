"""Chaining stages: a config file with a `pipeline:` section trains several stage configs in
order (stage N's `model.ckpt` names stage N-1's `checkpoint_final`), optionally making the
toy world first and scoring the last stage on its held-out questions.

    pipeline:
      toy_data: {out: toy_data, train_images: 600}    # written if <out>/README.json is absent
      stages: [train_configs/demo_stage1.yaml, ...]   # paths from the working directory
      evaluate_toy_vqa: true

Each stage config is loaded only when its turn comes, because its `model.ckpt` exists only
once the stage before it has finished. `--options` apply to every stage.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from omegaconf import OmegaConf

from ..config import load_config, register_section, to_plain
from ..registry import ConfigError, LocalPath, Section, check_kwargs


def toy_data_schema(out: str = "toy_data", seed: int = 0, train_images: int = 120, heldout_images: int = 40,
                    image_size: int = 112) -> None:
    """`pipeline.toy_data`: arguments of `tinygpt_v.data.make_toy_world`."""


def pipeline_schema(stages: list[LocalPath], toy_data: Annotated[dict, Section(toy_data_schema)] | None = None,
                    evaluate_toy_vqa: bool = False) -> None:
    """The `pipeline:` section."""


@register_section("pipeline")
def check_pipeline_section(section, key: str = "pipeline") -> None:
    section = to_plain(section) or {}
    check_kwargs(pipeline_schema, section, key)
    if not section["stages"]:
        raise ConfigError(f"{key}.stages", "list at least one stage config")
    if section.get("evaluate_toy_vqa") and section.get("toy_data") is None:
        raise ConfigError(f"{key}.evaluate_toy_vqa", "needs `pipeline.toy_data` (where the held-out questions are)")


def is_pipeline_file(path: str) -> bool:
    """Whether the file has a `pipeline:` section (an unreadable file is left to load_config)."""
    try:
        return "pipeline" in OmegaConf.load(path)
    except Exception:
        return False


def run_pipeline(cfg, options: list[str] = ()) -> dict:
    """Train every stage in order; returns {"checkpoints": [...], "toy_vqa": result or None}."""
    if set(cfg) != {"pipeline"}:
        raise ConfigError(sorted(set(cfg) - {"pipeline"})[0], "a pipeline file holds only `pipeline:`; put "
                                                               "model/datasets/run into its stage configs")
    from .trainer import train
    section = to_plain(cfg.pipeline)
    started = time.perf_counter()
    if section.get("toy_data") is not None:
        ensure_toy_world(**section["toy_data"])
    checkpoints, stage_cfg = [], None
    for n, stage in enumerate(section["stages"], 1):
        print(f"\n=== stage {n}/{len(section['stages'])}: {stage}", flush=True)
        stage_cfg = load_stage(stage, options, n, section["stages"])
        checkpoints.append(train(stage_cfg))
    result = None
    if section.get("evaluate_toy_vqa"):
        from .toy_eval import evaluate_checkpoint
        result = evaluate_checkpoint(stage_cfg, checkpoints[-1], section["toy_data"].get("out", "toy_data"))
        print(result["line"], flush=True)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s", flush=True)
    return {"checkpoints": checkpoints, "toy_vqa": result}


def load_stage(path: str, options, n: int, stages: list[str]):
    try:
        return load_config(path, options)
    except ConfigError as e:
        raise explain_missing_ckpt(e, stages[n - 2] if n > 1 else None) from None


def explain_missing_ckpt(error: ConfigError, previous_stage: str | None = None) -> ConfigError:
    """A `model.ckpt` that does not exist yet is, in a stage config, the previous stage's final
    checkpoint: say so, rather than only that a path is missing."""
    if not (error.key.startswith("model.ckpt") and "does not exist" in error.message):
        return error
    writer = f"the previous stage ({previous_stage})" if previous_stage else "an earlier run (stage N-1 for stage N)"
    return ConfigError(error.key, f"{error.message}; it is written by {writer}: train that first", error.file)


def ensure_toy_world(out: str = "toy_data", **kwargs) -> dict:
    """Write the toy world unless `<out>/README.json` is there already (with the same settings)."""
    from ..data import make_toy_world
    readme = Path(out) / "README.json"
    if readme.is_file():
        meta = json.loads(readme.read_text())
        differing = {k: (meta.get(k), v) for k, v in kwargs.items() if meta.get(k) != v}
        if not differing:
            return meta
        print(f"toy world in {out} was made with other settings {differing}; writing it again", flush=True)
    print(f"writing the toy world to {out}/ ...", flush=True)
    return make_toy_world(out, **{_ARG_NAMES.get(k, k): v for k, v in kwargs.items()})


# pipeline.toy_data keys are README.json's; two of make_toy_world's arguments are named otherwise
_ARG_NAMES = {"train_images": "n_train", "heldout_images": "n_heldout"}
