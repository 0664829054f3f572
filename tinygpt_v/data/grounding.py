"""Grounding: boxes as text, `{<x1><y1><x2><y2>}` on a 0-100 grid of the image.

* RefCOCO / RefCOCO+ / RefCOCOg (`refs(<split_by>).p` + `instances.json` per dataset folder):
  `refcoco` asks for the box of an expression (`[refer]`), `invrefcoco` the reverse (`[identify]`).
* Flickr30k Entities (`Sentences/<id>.txt` with `[/EN#<entity>/<type> phrase]` markup,
  `Annotations/<id>.xml` with boxes per entity, a split file of image ids):
  grounded caption (`[grounding]`), caption-to-phrase and object-to-phrase (`[detection]`).
* Visual Genome regions (`region_descriptions.json` + `image_data.json`): `refvg` (`[refer]`),
  regions smaller than 16384 px^2 as the original (following OFA).

Boxes are normalised by the size of the image file as read. A box-moving augmentation
(`augment: true` in the image processor) is refused: it would make every answer wrong.
"""
from __future__ import annotations

import os
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Annotated, Literal

from ..registry import DATASETS, PROCESSORS, ConfigError, LocalPath, Part
from . import prompts
from .base import (MapDataset, SkipSample, build_processors, format_box, image_file, read_json,
                   read_plain_pickle, record_field, require_dir, require_file, require_objects)

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 448}


def _processors(vis_processor, text_processor):
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    if getattr(vis, "augments", False):
        raise ConfigError("vis_processor.augment", "grounding data cannot use a cropping augmentation "
                                                   "(the boxes in the answers would no longer match)")
    return vis, text


# --- RefCOCO family -----------------------------------------------------------------------------

class RefCOCO(MapDataset):
    """records: (ref dict, box x,y,w,h in pixels)."""

    def __init__(self, records, image_root, image_pattern, inverse, vis, text):
        super().__init__(vis, text)
        self.records, self.image_root, self.image_pattern = records, image_root, image_pattern
        self.inverse = inverse

    def load(self, index: int, rng: random.Random) -> dict:
        ref, (x, y, w, h) = self.records[index]
        sentences = [s.get("raw") or s.get("sent") for s in record_field(ref, "sentences") if isinstance(s, dict)]
        if not sentences:
            raise SkipSample("bad_record", f"ref {ref.get('ref_id')} has no sentences")
        expression = self.text(rng.choice(sentences), "referring expression")
        image, (width, height) = self.image(os.path.join(self.image_root, image_file(self.image_pattern, ref)), rng)
        box = format_box((x, y, x + w, y + h), width, height)
        if self.inverse:
            prompt, answer = rng.choice(prompts.IDENTIFY).format(box), expression
        else:
            prompt, answer = rng.choice(prompts.REFER).format(expression), box
        return self.sample(ref.get("ref_id", index), prompts.image_instruction(prompt), answer, image)


def _read_refs(ann_root: str, dataset: str, split_by: str, split: str) -> list:
    folder = require_dir(os.path.join(ann_root, dataset), "ann_root")
    refs_path = os.path.join(folder, f"refs({split_by}).p")
    if os.path.isfile(refs_path):
        refs = read_plain_pickle(refs_path, "ann_root")
    else:
        refs_path = os.path.join(folder, f"refs({split_by}).json")
        refs = read_json(refs_path, "ann_root")
    require_objects(refs, refs_path, "ann_root", "ref")
    instances_path = os.path.join(folder, "instances.json")
    instances = read_json(instances_path, "ann_root")
    if not isinstance(instances, Mapping):
        raise ConfigError("ann_root", f"{instances_path}: expected an object with 'annotations'")
    require_objects(instances.get("annotations", []), instances_path, "ann_root", "annotation")
    boxes = {ann["id"]: ann["bbox"] for ann in instances.get("annotations", [])}
    records = [(ref, boxes[ref["ann_id"]]) for ref in refs
               if ref.get("split") == split and ref.get("ann_id") in boxes]
    if not records:
        raise ConfigError("ann_root", f"{refs_path}: no refs of split '{split}' with a box in instances.json")
    return records


def _refcoco(inverse, ann_root, image_root, dataset, split_by, split, image_pattern, vis_processor, text_processor):
    vis, text = _processors(vis_processor, text_processor)
    records = _read_refs(ann_root, dataset, split_by, split)
    return RefCOCO(records, require_dir(image_root, "image_root"), image_pattern, inverse, vis, text)


RefDataset = Literal["refcoco", "refcoco+", "refcocog"]


@DATASETS.register("refcoco")
def refcoco(ann_root: LocalPath, image_root: LocalPath, dataset: RefDataset = "refcoco", split_by: str = "unc",
            split: str = "train", image_pattern: str = "COCO_train2014_{image_id:012d}.jpg",
            vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
            text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> RefCOCO:
    """Expression -> box. `dataset` picks the folder under `ann_root` (refcoco, refcoco+, refcocog);
    `split_by` the refs file (unc; umd or google for refcocog)."""
    return _refcoco(False, ann_root, image_root, dataset, split_by, split, image_pattern, vis_processor, text_processor)


@DATASETS.register("invrefcoco")
def invrefcoco(ann_root: LocalPath, image_root: LocalPath, dataset: RefDataset = "refcoco", split_by: str = "unc",
               split: str = "train", image_pattern: str = "COCO_train2014_{image_id:012d}.jpg",
               vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
               text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> RefCOCO:
    """Box -> expression (the inverse task); same files as `refcoco`."""
    return _refcoco(True, ann_root, image_root, dataset, split_by, split, image_pattern, vis_processor, text_processor)


# --- Flickr30k Entities -----------------------------------------------------------------------------

_ENTITY = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]*)\]")


def parse_entities_sentence(line: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """`A [/EN#18/people man] ...` -> ("A man ...", [(entity id, phrase, start, end), ...])."""
    text, phrases, last = [], [], 0
    for match in _ENTITY.finditer(line):
        text.append(line[last:match.start()])
        start = sum(map(len, text))
        text.append(match.group(3))
        phrases.append((match.group(1), match.group(3), start, start + len(match.group(3))))
        last = match.end()
    text.append(line[last:])
    return "".join(text).strip(), phrases


def parse_entities_boxes(path: str) -> dict[str, list[tuple[int, int, int, int]]]:
    """Annotations/<id>.xml -> entity id -> boxes (x1, y1, x2, y2); one box may serve several ids."""
    boxes: dict[str, list] = {}
    for obj in ET.parse(path).getroot().iter("object"):
        box = obj.find("bndbox")
        if box is None:  # nobndbox / scene entries
            continue
        xyxy = tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append(xyxy)
    return boxes


class Flickr30kEntities(MapDataset):
    """records: image ids; a sample picks one of the image's sentences (and, for
    object-to-phrase, one of its boxed phrases) with the sample's rng."""

    def __init__(self, records, entities_root, image_root, task, vis, text):
        super().__init__(vis, text)
        self.records, self.entities_root, self.image_root, self.task = records, entities_root, image_root, task

    def load(self, index: int, rng: random.Random) -> dict:
        image_id = self.records[index]
        sentence, phrases, boxes = self._annotation(image_id, rng)
        image, (width, height) = self.image(os.path.join(self.image_root, f"{image_id}.jpg"), rng)
        boxed = [(p, "<delim>".join(format_box(b, width, height) for b in boxes[e]), start, end)
                 for e, p, start, end in phrases if e in boxes]
        if not boxed:
            raise SkipSample("bad_record", f"Flickr30k {image_id}: the sentence has no boxed phrase")
        prompt, answer = self._task_text(sentence, boxed, rng)
        return self.sample(image_id, prompts.image_instruction(prompt), answer, image)

    def _annotation(self, image_id: str, rng: random.Random):
        sentences_path = os.path.join(self.entities_root, "Sentences", f"{image_id}.txt")
        try:
            with open(sentences_path, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            boxes = parse_entities_boxes(os.path.join(self.entities_root, "Annotations", f"{image_id}.xml"))
        except (OSError, ET.ParseError, TypeError, ValueError) as e:
            raise SkipSample("bad_record", f"Flickr30k {image_id}: {e}") from None
        if not lines:
            raise SkipSample("empty_text", f"{sentences_path} has no sentences")
        sentence, phrases = parse_entities_sentence(rng.choice(lines))
        return self.text(sentence, "sentence"), phrases, boxes

    def _task_text(self, sentence, boxed, rng) -> tuple[str, str]:
        if self.task == "grounded_caption":
            answer, last = [], 0
            for phrase, box, start, end in boxed:  # phrases -> "<p>phrase</p> {box}" in place
                answer.append(f"{sentence[last:start]}<p>{phrase}</p> {box}")
                last = end
            return rng.choice(prompts.GROUNDED_CAPTION), "".join(answer) + sentence[last:]
        if self.task == "caption_to_phrase":
            return rng.choice(prompts.DETECTION).format(sentence), "".join(f"<p>{p}</p> {b}" for p, b, _, _ in boxed)
        phrase, box, _, _ = rng.choice(boxed)  # object_to_phrase
        return rng.choice(prompts.DETECTION).format(phrase), f"<p>{phrase}</p> {box}"


def _flickr(task, entities_root, image_root, split_file, vis_processor, text_processor):
    if text_processor is not None:
        # a cleaned sentence would no longer line up with the phrase offsets of the markup
        raise ConfigError("text_processor", "Flickr30k Entities keeps sentences as written; remove it")
    vis, _ = _processors(vis_processor, None)
    require_dir(os.path.join(entities_root, "Sentences"), "entities_root")
    require_dir(os.path.join(entities_root, "Annotations"), "entities_root")
    with open(require_file(split_file, "split_file"), encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ConfigError("split_file", f"{split_file}: no image ids")
    return Flickr30kEntities(ids, entities_root, require_dir(image_root, "image_root"), task, vis, None)


@DATASETS.register("flickr_grounded_caption")
def flickr_grounded_caption(entities_root: LocalPath, image_root: LocalPath, split_file: LocalPath,
                            vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                            text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> Flickr30kEntities:
    """`[grounding]` -> the sentence with `<p>phrase</p> {box}` after each boxed phrase."""
    return _flickr("grounded_caption", entities_root, image_root, split_file, vis_processor, text_processor)


@DATASETS.register("flickr_caption_to_phrase")
def flickr_caption_to_phrase(entities_root: LocalPath, image_root: LocalPath, split_file: LocalPath,
                             vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                             text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> Flickr30kEntities:
    """`[detection] <sentence>` -> `<p>phrase</p> {box}` for every boxed phrase."""
    return _flickr("caption_to_phrase", entities_root, image_root, split_file, vis_processor, text_processor)


@DATASETS.register("flickr_object_to_phrase")
def flickr_object_to_phrase(entities_root: LocalPath, image_root: LocalPath, split_file: LocalPath,
                            vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                            text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> Flickr30kEntities:
    """`[detection] <phrase>` -> `<p>phrase</p> {box}`."""
    return _flickr("object_to_phrase", entities_root, image_root, split_file, vis_processor, text_processor)


# --- Visual Genome -------------------------------------------------------------------------------------

class VisualGenomeRefer(MapDataset):
    """records: (image file relative to image_root, region id, x, y, w, h, phrase)."""

    def __init__(self, records, image_root, vis, text):
        super().__init__(vis, text)
        self.records, self.image_root = records, image_root

    def load(self, index: int, rng: random.Random) -> dict:
        file, region_id, x, y, w, h, phrase = self.records[index]
        expression = self.text(phrase, "region phrase")
        image, (width, height) = self.image(os.path.join(self.image_root, file), rng)
        box = format_box((x, y, x + w, y + h), width, height)
        prompt = rng.choice(prompts.REFER).format(expression)
        return self.sample(region_id, prompts.image_instruction(prompt), box, image)


def _vg_records(data_root: str, max_region_area: int) -> list[tuple]:
    # image files are named by the last two parts of the url: VG_100K/<id>.jpg or VG_100K_2/<id>.jpg
    files = {}
    for meta in _objects(os.path.join(data_root, "image_data.json"), "image"):
        files[meta.get("image_id", meta.get("id"))] = "/".join(meta["url"].split("/")[-2:])
    records = []
    for entry in _objects(os.path.join(data_root, "region_descriptions.json"), "entry"):
        for r in entry.get("regions", []):
            if r["width"] * r["height"] < max_region_area and r["image_id"] in files:
                records.append((files[r["image_id"]], r.get("region_id", len(records)),
                                r["x"], r["y"], r["width"], r["height"], r.get("phrase")))
    if not records:
        raise ConfigError("data_root", f"{data_root}: no regions smaller than {max_region_area} px^2")
    return records


def _objects(path: str, what: str) -> list:
    items = read_json(path, "data_root")
    if not isinstance(items, list):
        raise ConfigError("data_root", f"{path}: expected a list")
    require_objects(items, path, "data_root", what)
    return items


@DATASETS.register("refvg")
def refvg(data_root: LocalPath, max_region_area: int = 16384,
          vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
          text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> VisualGenomeRefer:
    """Visual Genome region descriptions as `[refer]`; `data_root` holds the two jsons and
    the VG_100K / VG_100K_2 image folders."""
    vis, text = _processors(vis_processor, text_processor)
    return VisualGenomeRefer(_vg_records(data_root, max_region_area), data_root, vis, text)
