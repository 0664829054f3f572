"""Turning what a user hands us (a path, a PIL image, an array, a tensor) into model pixels.

A file is read as the training data is (`tinygpt_v.data.load_image`): its size is checked from
the header before any pixel is decoded, so a decompression bomb (a small file that decodes to
gigabytes) is an `ImageError` naming the file, like a missing, empty, unreadable or truncated
one, and never takes the session down."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..data.base import DEFAULT_MAX_IMAGE_PIXELS
from ..data.images import SkipSample, load_image
from ..data.processors import build_processor


class ImageError(ValueError):
    """An image file that cannot be used; the message names it and says why."""


def image_processor(model, image_size: int | None = None):
    """The evaluation processor (`blip2_image_eval`) at the vision encoder's size."""
    size = image_size or getattr(model.vision, "image_size", None)
    if size is None:
        raise ValueError("the vision encoder does not say its image size: set inference.image_size")
    return build_processor({"name": "blip2_image_eval", "image_size": size})


def to_pixels(image, processor, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """(1, 3, S, S) pixels from a path, PIL image, HxWx3 uint8 array, or processed tensor.
    A path is refused (ImageError) when it is not a readable image of at most `max_pixels`."""
    if isinstance(image, torch.Tensor):  # already processed
        return image.unsqueeze(0) if image.dim() == 3 else image
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image, max_pixels)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return processor(image).unsqueeze(0)


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The RGB image in `path` (the processor converts any mode: 16-bit, palette...)."""
    try:
        return load_image(os.path.expanduser(str(path)), max_pixels)
    except SkipSample as e:
        detail = e.detail if str(path) in e.detail else f"{path}: {e.detail}"
        raise ImageError(f"{detail} ({e.reason.replace('_', ' ')})") from None
