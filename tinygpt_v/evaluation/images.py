"""Image loading for evaluation: the `blip2_image_eval` processor (resize, CLIP normalisation)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..registry import PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The registered `blip2_image_eval` processor when the data package provides it, so training
    and evaluation share one implementation; otherwise the same transform written here."""
    import tinygpt_v.data  # noqa: F401  (registers the processors, if present)
    if "blip2_image_eval" in PROCESSORS:
        return PROCESSORS.build({"name": "blip2_image_eval", "image_size": image_size}, "evaluation.image_size")
    return lambda image: _blip2_image_eval(image, image_size)


def _blip2_image_eval(image: Image.Image, image_size: int) -> torch.Tensor:
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def load_image(path: str, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image.convert("RGB"))
