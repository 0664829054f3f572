"""Caption datasets: cc_sbu_align (stage 3) and TextCaps (stage 4).

cc_sbu_align is MiniGPT-4's 3.5k detailed descriptions: `filter_cap.json` =
`{"annotations": [{"image_id": "2", "caption": "..."}]}` and `image/<image_id>.jpg`. Its
prompts are the instruction templates of a prompt file (`tinygpt_v/prompts/alignment.txt` by
default); the caption is used exactly as written, as the original's `cc_sbu_dataset.py` returns
it (no text processor: these are long, cased, punctuated descriptions; a `text_processor:` in
the config is applied if you ask for one).

TextCaps: `TextCaps_0.1_train.json` = `{"data": [{"image_id", "caption_str", ...}]}` and
`train_images/<image_id>.jpg`. Instruction `<Img><ImageHere></Img> [caption] {} ` from the
original's 17 TextCaps templates; the caption through `blip_caption`, as the original.
"""
from __future__ import annotations

import os
import random
from typing import Annotated

from ..registry import DATASETS, PROCESSORS, ConfigError, LocalPath, Part
from . import prompts
from .base import MapDataset, build_processors, check_first_record, image_file, read_json, record_field, require_dir
from .instruct import as_written

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 224}


class CaptionDataset(MapDataset):
    """One record = one image + one caption; the prompt is a template from `templates`."""

    def __init__(self, records, image_root, image_pattern, caption_field, templates, vis, text, as_written=False):
        super().__init__(vis, text)
        self.records, self.image_root, self.image_pattern = records, image_root, image_pattern
        self.caption_field, self.templates = caption_field, templates
        self.as_written = as_written  # no processor: the caption exactly as in the file, not even stripped

    def load(self, index: int, rng: random.Random) -> dict:
        record = self.records[index]
        path = os.path.join(self.image_root, image_file(self.image_pattern, record))
        caption = (as_written if self.as_written else self.text)(record_field(record, self.caption_field), "caption")
        image, _ = self.image(path, rng)
        return self.sample(record.get("image_id", index), rng.choice(self.templates), caption, image)


def _annotations(ann_path: str, list_key: str, required: list[str], key: str = "ann_path") -> list:
    data = read_json(ann_path, key)
    if not isinstance(data, dict) or not isinstance(data.get(list_key), list):
        raise ConfigError(key, f"{ann_path}: expected an object with a '{list_key}' list")
    check_first_record(data[list_key], required, ann_path, key)
    return data[list_key]


@DATASETS.register("cc_sbu_align")
def cc_sbu_align(ann_path: LocalPath, image_root: LocalPath,
                 prompt_file: LocalPath | None = None,
                 image_pattern: str = "{image_id}.jpg",
                 vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                 text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> CaptionDataset:
    """MiniGPT-4 stage-2 alignment data (`filter_cap.json` + `image/`); stage 3 here."""
    records = _annotations(ann_path, "annotations", ["image_id", "caption"])
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    templates = prompts.load_prompt_file(prompt_file)
    return CaptionDataset(records, require_dir(image_root, "image_root"), image_pattern, "caption", templates, vis, text,
                          as_written=text is None)


@DATASETS.register("textcaps_caption")
def textcaps_caption(ann_path: LocalPath, image_root: LocalPath,
                     image_pattern: str = "{image_id}.jpg",
                     vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                     text_processor: Annotated[dict, Part(PROCESSORS)] | None = {"name": "blip_caption"}) -> CaptionDataset:
    """TextCaps captions (text in the image) with `[caption]` instructions."""
    records = _annotations(ann_path, "data", ["image_id", "caption_str"])
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    templates = [prompts.image_instruction(t) for t in prompts.CAPTION]
    return CaptionDataset(records, require_dir(image_root, "image_root"), image_pattern, "caption_str", templates, vis, text)
