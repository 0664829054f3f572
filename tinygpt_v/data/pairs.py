"""Image-text pairs in webdataset tar shards: LAION and CC3M+CC12M+SBU (stages 1 and 2).

The shards are what img2dataset writes: per sample `<key>.jpg`, `<key>.txt` (the caption) and
`<key>.json` (metadata with a `caption` field). The prompt is just the image, the answer the
cleaned caption, as in the original's first two stages.

Streaming is epoch based: each epoch visits the rank's shards in a seeded order, through a
seeded shuffle buffer. The position is (epoch, samples consumed), so a resumed run replays
the same stream and drops the consumed samples before decoding anything.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from typing import Annotated

from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..registry import DATASETS, PROCESSORS, ConfigError, Part
from .base import StreamDataset, build_processors
from .images import SkipSample

log = logging.getLogger(__name__)

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 224}
DEFAULT_TEXT = {"name": "blip_caption"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns: str | Sequence[str], key: str = "shards") -> list[str]:
    """Brace patterns (`laion/{00000..10488}.tar`) -> the shard files that exist.

    img2dataset leaves no file for a shard whose downloads all failed, so gaps are normal and
    only logged; no shard at all is an error naming the pattern."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    named = [os.path.expanduser(p) for pattern in patterns for p in braceexpand(pattern)]
    found = [p for p in named if os.path.isfile(p)]
    if not found:
        raise ConfigError(key, f"no shard files match {patterns}")
    if len(found) < len(named):
        log.warning("%s: %d of %d shards named by %s do not exist", key, len(named) - len(found), len(named), patterns)
    return found


class WebDatasetPairs(StreamDataset):
    def __init__(self, shards: list[str], vis_processor, text_processor, shuffle_buffer: int):
        super().__init__(vis_processor, text_processor)
        self.shards = shards
        self.shuffle_buffer = shuffle_buffer

    # --- raw stream (no decoding: cheap to replay on resume) ---

    def raw_samples(self, epoch: int, seed: int, rank: int, world_size: int) -> Iterator[dict]:
        rng = random.Random(f"{seed}/{self.name}/shards/{epoch}")
        shards = list(self.shards)
        rng.shuffle(shards)  # the same order on every rank, so the split below is disjoint
        if len(shards) >= world_size:
            stream = self._read(shards[rank::world_size])
        else:
            # fewer shards than ranks: every rank reads them all and keeps every world_size-th
            stream = (s for i, s in enumerate(self._read(shards)) if i % world_size == rank)
        return _shuffled(stream, self.shuffle_buffer, random.Random(f"{seed}/{self.name}/buffer/{epoch}/{rank}"))

    def _read(self, shards: list[str]) -> Iterator[dict]:
        for shard in shards:
            yield from group_by_keys(self._members(shard), handler=self._grouping_error(shard))

    def _grouping_error(self, shard: str):
        """A member name met twice in one sample (`a.jpg`, `a.jpg`): keep the first, count it."""
        def handle(error: Exception) -> bool:
            what = error.args[0] if error.args else repr(error)
            self.skips.add("duplicate_member", f"{shard}: {what} (the first is kept)")
            return True  # go on with the next member
        return handle

    def _members(self, shard: str) -> Iterator[dict]:
        try:
            with open(shard, "rb") as f:
                for member in tar_file_iterator(f):
                    member["__url__"] = shard
                    yield member
        except (tarfile.TarError, OSError, EOFError) as e:
            # a truncated (or vanished) shard: keep what came before, count it once, go on to the next
            self.skips.add("truncated_tar", f"{shard}: {e}")
        yield {}  # end-of-shard marker for group_by_keys

    # --- decoding ---

    def decode(self, raw: dict, rng: random.Random) -> dict:
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        caption = self._caption(raw, where)
        if image_bytes is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("incomplete_sample", f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)}); "
                                                  f"it has {members}")
        image, _ = self.image(image_bytes, rng, where)
        # the original's stages 1-2: [BOS] image caption, no <Img> text (a prompt_template such as
        # "<Img>{}</Img>" in the model config adds it back)
        return self.sample(raw["__key__"], "<ImageHere>", self.text(caption, f"caption of {where}"), image)

    @staticmethod
    def _caption(raw: dict, where: str) -> str:
        if "txt" in raw:
            return raw["txt"].decode("utf-8", errors="replace")
        if "json" in raw:
            try:
                return json.loads(raw["json"])["caption"]
            except (ValueError, KeyError, TypeError) as e:
                raise SkipSample("malformed_json", f"{where}.json: {e!r}") from None
        raise SkipSample("incomplete_sample", f"{where}: no txt or json member")


def _shuffled(stream: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: fill to `buffer_size`, then emit a random element per new arrival."""
    if buffer_size <= 1:
        yield from stream
        return
    buffer: list = []
    for item in stream:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _pairs(shards, vis_processor, text_processor, shuffle_buffer) -> WebDatasetPairs:
    vis, text = build_processors(vis_processor, text_processor or DEFAULT_TEXT, DEFAULT_VIS)
    return WebDatasetPairs(expand_shards(shards), vis, text, shuffle_buffer)


@DATASETS.register("laion")
def laion(shards: str | list[str],
          vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
          text_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
          shuffle_buffer: int = 1000) -> WebDatasetPairs:
    """LAION (the original's 115-ratio stage 1-2 source): img2dataset shards."""
    return _pairs(shards, vis_processor, text_processor, shuffle_buffer)


@DATASETS.register("cc_sbu")
def cc_sbu(shards: str | list[str],
           vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
           text_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
           shuffle_buffer: int = 1000) -> WebDatasetPairs:
    """CC3M + CC12M + SBU in one img2dataset run (the original's 14-ratio source)."""
    return _pairs(shards, vis_processor, text_processor, shuffle_buffer)
