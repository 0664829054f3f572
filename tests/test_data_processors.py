"""Image and text processors: numerics against a plain PIL/torch reference, every PIL mode."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tinygpt_v.data import CLIP_MEAN, CLIP_STD, build_processor, load_image, to_rgb
from tinygpt_v.registry import ConfigError


def reference_eval(image: Image.Image, size: int) -> torch.Tensor:
    """Resize bicubic + CLIP normalisation, written out by hand."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    pixels = (pixels - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(pixels.transpose(2, 0, 1)).float()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(61, 97, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", ["blip2_image_eval", "blip2_image_train"])
def test_image_processor_matches_reference(photo, name, size):
    out = build_processor({"name": name, "image_size": size})(photo)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert torch.max(torch.abs(out - reference_eval(photo, size))).item() < 1e-6


def test_augmentation_is_seeded_and_off_by_default(photo):
    augment = build_processor({"name": "blip2_image_train", "image_size": 64, "augment": True, "min_scale": 0.3})
    a = augment(photo, rng=random.Random(1))
    assert torch.equal(a, augment(photo, rng=random.Random(1)))
    assert not torch.equal(a, augment(photo, rng=random.Random(2)))
    plain = build_processor({"name": "blip2_image_train", "image_size": 64})
    assert torch.equal(plain(photo, rng=random.Random(1)), plain(photo, rng=random.Random(2)))


def test_processor_section_is_checked():
    with pytest.raises(ConfigError, match=r"processor\.image_sise: unknown key \(did you mean 'image_size'\?\)"):
        build_processor({"name": "blip2_image_eval", "image_sise": 224})
    with pytest.raises(ConfigError, match="unknown processor 'blip2_image'"):
        build_processor({"name": "blip2_image"})


def test_mode_conversion_keeps_colour_values():
    grey = Image.new("L", (2, 2), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("LA", (2, 2), (90, 0))).getpixel((0, 0)) == (90, 90, 90)
    # alpha is dropped, the colour underneath is kept (as the original's convert("RGB"))
    assert to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0))).getpixel((0, 0)) == (10, 20, 30)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (200, 100, 50)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in naive CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    values = np.array([[0, 32896], [65535, 257]], dtype=np.uint16)  # 0, 128, 255, 1 in 8 bits
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")  # a real 16-bit PNG file
    image = load_image(buffer.getvalue(), max_pixels=None)
    assert image.mode == "RGB"
    assert [image.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 1]
    sixteen = Image.new("I;16", (2, 1))
    sixteen.frombytes(np.array([[65535, 32896]], dtype="<u2").tobytes())
    assert [to_rgb(sixteen).getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (128, 128, 128)]


def test_blip_caption_cleans_like_lavis():
    clean = build_processor({"name": "blip_caption"})
    assert clean("A Man, riding: a (horse)!!  \n") == "a man, riding a horse"
    assert clean("Is it #1~ \"really\"?") == "is it 1 really ?"
    assert clean(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert build_processor({"name": "blip_caption", "max_words": 2, "prompt": "a photo of "})("Red Dog Runs") \
        == "a photo of red dog"
