"""Image and text processors of the original (LAVIS/MiniGPT-4 names and constants).

`blip2_image_eval`: resize to (S, S) bicubic -> [0, 1] tensor -> CLIP normalisation.
`blip2_image_train`: the same (as MiniGPT-v2/TinyGPT-V train); with `augment: true` it first
takes a random resized crop (area scale `min_scale`..`max_scale`), as LAVIS' BLIP-2 did.
Augmenting moves objects, so grounding datasets refuse it.
`blip_caption`: LAVIS' caption cleaning (lower-case, drop `.!"()*#:;~`, collapse spaces,
cut to `max_words` words).

Build one from a config section with `build_processor({"name": "blip2_image_eval", "image_size": 448})`.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..registry import PROCESSORS
from .images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_processor(section: Mapping, key: str = "processor"):
    """A processor from its config section `{name: ..., **kwargs}` (checked like any section)."""
    return PROCESSORS.build(section, key)


class ImageProcessor:
    """Callable `(PIL image, rng=None) -> FloatTensor(3, S, S)`."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] | None = None):
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.crop_scale = crop_scale  # None: no augmentation
        self.augments = crop_scale is not None

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = to_rgb(image)
        size = [self.image_size, self.image_size]
        if self.crop_scale is None:
            image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
        else:
            top, left, height, width = random_resized_crop_box(image.size, self.crop_scale, rng or random.Random())
            image = TF.resized_crop(image, top, left, height, width, size, interpolation=InterpolationMode.BICUBIC)
        return self.normalise(image)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """to_tensor + Normalize, in float32 as torchvision computes them. Done in numpy: torch's
        intra-op threads on many small tensors slow data loading badly on a busy CPU."""
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ImageProcessor(size={self.image_size}, augment={self.augments})"


def random_resized_crop_box(image_size: tuple[int, int], scale: tuple[float, float], rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` so a sample is reproducible."""
    width, height = image_size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fall back to a centre crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@PROCESSORS.register("blip2_image_eval")
def blip2_image_eval(image_size: int = 224, mean: list[float] = CLIP_MEAN, std: list[float] = CLIP_STD) -> ImageProcessor:
    return ImageProcessor(image_size, mean, std)


@PROCESSORS.register("blip2_image_train")
def blip2_image_train(image_size: int = 224, mean: list[float] = CLIP_MEAN, std: list[float] = CLIP_STD,
                      augment: bool = False, min_scale: float = 0.5, max_scale: float = 1.0) -> ImageProcessor:
    return ImageProcessor(image_size, mean, std, crop_scale=(min_scale, max_scale) if augment else None)


class CaptionProcessor:
    """LAVIS BlipCaptionProcessor: `prompt` + cleaned caption."""

    _PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
    _SPACES = re.compile(r"\s{2,}")

    def __init__(self, max_words: int = 50, prompt: str = ""):
        self.max_words, self.prompt = max_words, prompt

    def __call__(self, caption: str) -> str:
        caption = self._PUNCTUATION.sub(" ", caption.lower())
        caption = self._SPACES.sub(" ", caption).rstrip("\n").strip(" ")
        words = caption.split(" ")
        if len(words) > self.max_words:
            caption = " ".join(words[: self.max_words])
        return self.prompt + caption


@PROCESSORS.register("blip_caption")
def blip_caption(max_words: int = 50, prompt: str = "") -> CaptionProcessor:
    return CaptionProcessor(max_words, prompt)
