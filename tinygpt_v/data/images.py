"""Reading one image from a file or from bytes, safely, as RGB.

Every way an image can be bad becomes a `SkipSample` with its own reason, so the loader can
count and log it and carry on:

  missing_image       the file is not there
  empty_file          0 bytes
  unreadable_image    not an image PIL knows (undecodable JPEG header, random bytes)
  truncated_image     the header is fine but the pixel data is cut short or corrupt
  decompression_bomb  more pixels than the limit (checked from the header, before decoding)
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError


class SkipSample(Exception):
    """This sample is bad input: skip it, count `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# 16-bit greyscale modes: PIL's own convert("RGB") clips them at 255 (nearly all white), so
# they are scaled from 0..65535 to 0..255 instead.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(source: str | os.PathLike | bytes, max_pixels: int | None, where: str | None = None) -> Image.Image:
    """Open, check size, decode and convert to RGB; raise SkipSample on bad input.

    `where` names the image in messages (a shard and sample key for bytes from a tar shard);
    by default the file path."""
    if where is None:
        where = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    data = _read_bytes(source, where)
    try:
        # PIL itself raises above twice Image.MAX_IMAGE_PIXELS (a header-only check); our
        # own, configurable limit is checked right after, also before any pixel is decoded.
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("decompression_bomb", f"{where}: {e}") from None
    except UnidentifiedImageError:  # PIL's own message names only an in-memory buffer object
        raise SkipSample("unreadable_image", f"{where}: cannot identify image file "
                                             f"(not an image format PIL reads; {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipSample("unreadable_image", f"{where}: {e}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise SkipSample("decompression_bomb", f"{where}: {width}x{height} pixels exceed the limit {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SkipSample("truncated_image", f"{where}: {e}") from None
    return to_rgb(image)


def _read_bytes(source, where: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SkipSample("missing_image", where) from None
        except IsADirectoryError:
            raise SkipSample("missing_image", f"{where} is a directory") from None
        except OSError as e:  # permission denied, I/O error: this image is lost, not the run
            raise SkipSample("unreadable_image", f"{where}: {e.strerror or e}") from None
    if not data:
        raise SkipSample("empty_file", where)
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. As the original, alpha is dropped (not composited on white), so an
    RGB(A) image's colour values are unchanged; 16-bit greyscale is rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palette images with transparency
    return image.convert("RGB")
