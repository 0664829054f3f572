"""Checks of a training config that need more than one section, done before anything is built.

Building the real model takes minutes; a mistake that can be seen from the config alone must
not wait for it. At config load (registered with `register_config_check`):

* `model.trainable` of a training config (one with `run:`) names at least one group, and every
  group it names has parameters in the model the `model:` section describes (`lora` needs a
  `model.lora` section, `qformer` / `query_tokens` a `model.qformer` one);
* a dataset's `vis_processor.image_size` equals the vision encoder's `model.vision.image_size`.

The trainer builds the data before the model, so missing files or shards are reported first,
and then repeats the image-size check on the built datasets (which also covers a dataset that
leaves `vis_processor` to its builder's default).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from ..config import register_config_check
from ..registry import PROCESSORS, VISION_ENCODERS, ConfigError

# Groups that exist only when the model section has the part that holds them.
GROUPS_NEEDING = {"qformer": "qformer", "query_tokens": "qformer", "lora": "lora"}


@register_config_check
def check_training_config(cfg: Mapping) -> None:
    model, datasets = cfg.get("model"), cfg.get("datasets")
    if not isinstance(model, Mapping):
        return
    if "run" in cfg:
        check_trainable_groups(model)
    if isinstance(datasets, Mapping):
        for entry, options in datasets.items():
            processor = options.get("vis_processor") if isinstance(options, Mapping) else None
            if isinstance(processor, Mapping):
                check_image_size(model, _processor_image_size(processor),
                                 f"datasets.{entry}.vis_processor.image_size")


def check_trainable_groups(model: Mapping, key: str = "model.trainable") -> None:
    """A training run trains something, and every named group exists in this model."""
    trainable = list(model.get("trainable", ["projection"]))
    if not trainable:
        raise ConfigError(key, "is empty: a training run needs at least one parameter group to train "
                               "(e.g. [projection])")
    for i, group in enumerate(trainable):
        part = GROUPS_NEEDING.get(group)
        if part and not model.get(part):
            raise ConfigError(f"{key}[{i}]", f"group '{group}' has no parameters in this model: it needs a "
                                             f"`model.{part}` section")


def vision_image_size(model: Mapping) -> int | None:
    """`model.vision.image_size`, or its builder's default; None when the encoder has no such setting."""
    vision = model.get("vision")
    if not isinstance(vision, Mapping) or vision.get("name") not in VISION_ENCODERS:
        return None
    if "image_size" in vision:
        return vision["image_size"]
    param = inspect.signature(VISION_ENCODERS.get(vision["name"])).parameters.get("image_size")
    return None if param is None or param.default is param.empty else param.default


def check_image_size(model: Mapping, data_size: int | None, data_key: str) -> None:
    model_size = vision_image_size(model)
    if data_size is None or model_size is None or data_size == model_size:
        return
    raise ConfigError(data_key, f"{data_size} differs from model.vision.image_size {model_size}: the vision "
                                f"encoder takes {model_size}x{model_size} images; set both to the same size")


def check_built_datasets(model: Mapping, datasets: Mapping) -> None:
    """The image size each built dataset really produces (its processor, default or not)."""
    for name, dataset in datasets.items():
        size = getattr(getattr(dataset, "vis_processor", None), "image_size", None)
        check_image_size(model, size, f"datasets.{name}.vis_processor.image_size")
    from ..data.custom import preflight  # your own data (llava_json / qa_jsonl): images, lengths, mostly bad?
    preflight(datasets, model=model)


def _processor_image_size(processor: Mapping) -> int | None:
    if "image_size" in processor:
        return processor["image_size"]
    if processor.get("name") not in PROCESSORS:
        return None
    param = inspect.signature(PROCESSORS.get(processor["name"])).parameters.get("image_size")
    return None if param is None or param.default is param.empty else param.default
