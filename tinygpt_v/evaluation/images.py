"""Image loading for evaluation: the data package's `blip2_image_eval` processor (resize bicubic,
CLIP normalisation), so training and evaluation share one implementation.

Images are read with the data package's safe reader too (pixel limit checked from the header,
before decoding). A bad benchmark image is an error, not a skip: a score over fewer samples than
the benchmark holds would not be comparable. The runner adds the benchmark and sample to the
message; predictions made before it are kept, so a rerun resumes once the file is fixed."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ..data.base import DEFAULT_MAX_IMAGE_PIXELS
from ..data.images import SkipSample
from ..data.images import load_image as read_image
from ..data.processors import build_processor
from .benchmark import BenchmarkDataError


class BadImageError(BenchmarkDataError):
    """A benchmark image that cannot be used: missing, empty, not an image, truncated, too large
    (eval.py prints it as one line)."""


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    return build_processor({"name": "blip2_image_eval", "image_size": image_size}, "evaluation.image_size")


def load_image(path: str, transform: Callable[[Image.Image], torch.Tensor],
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read, check, RGB-convert and transform one image; BadImageError names the file and why."""
    try:
        image = read_image(path, max_pixels)
    except SkipSample as bad:  # the detail starts with the path
        raise BadImageError(f"{bad.reason.replace('_', ' ')}: {bad.detail}") from None
    return transform(image)
