"""Image loading for evaluation: the data package's `blip2_image_eval` processor (resize bicubic,
CLIP normalisation), so training and evaluation share one implementation."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ..data.processors import build_processor


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    return build_processor({"name": "blip2_image_eval", "image_size": image_size}, "evaluation.image_size")


def load_image(path: str, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image)  # the processor converts any mode to RGB
