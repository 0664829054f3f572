"""Turning what a user hands us (a path, a PIL image, an array, a tensor) into model pixels."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..data.processors import build_processor


def image_processor(model, image_size: int | None = None):
    """The evaluation processor (`blip2_image_eval`) at the vision encoder's size."""
    size = image_size or getattr(model.vision, "image_size", None)
    if size is None:
        raise ValueError("the vision encoder does not say its image size: set inference.image_size")
    return build_processor({"name": "blip2_image_eval", "image_size": size})


def to_pixels(image, processor) -> torch.Tensor:
    """(1, 3, S, S) pixels from a path, PIL image, HxWx3 uint8 array, or processed tensor."""
    if isinstance(image, torch.Tensor):  # already processed
        return image.unsqueeze(0) if image.dim() == 3 else image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = opened.copy()  # the processor converts any mode (16-bit, palette...) to RGB
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return processor(image).unsqueeze(0)
