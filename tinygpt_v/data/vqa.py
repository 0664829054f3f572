"""Visual question answering: COCO VQAv2, OK-VQA, A-OKVQA, GQA, OCR-VQA.

Annotation files are the ones the original reads:
* VQAv2 / OK-VQA: LAVIS' `vqa_train.json` / `okvqa_train.json`, a list of
  {"question_id", "question", "answer": [10 human answers], "image": "train2014/COCO_train2014_...jpg"}
  (`dataset/convert_vqa.py` makes them from the official question + annotation files).
* A-OKVQA: the official `aokvqa_v1p0_train.json`, {"question_id", "question", "direct_answers",
  "image_id"} (image path by `image_pattern`, default `train2017/{image_id:012d}.jpg`), or LAVIS'
  version with an `image` field.
* GQA: LAVIS' `train_balanced_questions.json` ({"question_id", "question", "answer", "image"})
  or the official dict {question id: {"imageId", "question", "answer", ...}} with
  `image_pattern: "{imageId}.jpg"`.
* OCR-VQA: `dataset.json` = {image id: {"imageURL", "questions", "answers", "split"}}, split 1 = train.

With several human answers, one is drawn per sample weighted by how many annotators gave it,
as the original does. The question and the drawn answer are cleaned by the text processor
(`blip_caption` by default), and the instruction is `<Img><ImageHere></Img> [vqa] ... ` with
the original's trailing space.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Mapping
from typing import Annotated

from ..registry import DATASETS, PROCESSORS, ConfigError, LocalPath, Part
from . import prompts
from .base import (MapDataset, SkipSample, build_processors, check_first_record, image_file, read_json, record_field,
                   require_dir)

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 448}
BLIP_CAPTION = {"name": "blip_caption"}


class VQADataset(MapDataset):
    def __init__(self, records, image_root, image_pattern, answer_field, vis, text, templates=prompts.VQA):
        super().__init__(vis, text)
        self.records, self.image_root, self.image_pattern = records, image_root, image_pattern
        self.answer_field, self.templates = answer_field, templates

    def load(self, index: int, rng: random.Random) -> dict:
        record = self.records[index]
        question = self.text(record_field(record, "question"), "question")
        answer = pick_answer(record_field(record, self.answer_field), rng)
        if not answer.strip():
            raise SkipSample("empty_text", f"question {record.get('question_id', index)}: empty answer")
        answer = self.text(answer, "answer")
        image, _ = self.image(os.path.join(self.image_root, image_file(self.image_pattern, record)), rng)
        prompt = prompts.image_instruction(rng.choice(self.templates).format(question))
        return self.sample(record.get("question_id", index), prompt, answer, image)


def pick_answer(answers, rng: random.Random) -> str:
    """One answer; from a list, drawn with weight = its share of the annotators."""
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise SkipSample("bad_record", f"answers must be a string or a non-empty list of strings, got {answers!r}")
    counts = Counter(answers)
    choices = list(counts)  # first-seen order, so the draw is reproducible
    return rng.choices(choices, weights=[counts[a] for a in choices], k=1)[0]


def _vqa(ann_paths, image_root, image_pattern, answer_field, vis_processor, text_processor) -> VQADataset:
    records = []
    for i, path in enumerate([ann_paths] if isinstance(ann_paths, str) else ann_paths):
        key = f"ann_paths[{i}]"
        data = read_json(path, key)
        if isinstance(data, dict):  # official GQA layout: {question id: record}
            # a value that is not an object stays as it is: check_first_record turns it into a
            # counted skip, as in the list layout
            data = [{"question_id": qid, **record} if isinstance(record, Mapping) else record
                    for qid, record in data.items()]
        if not isinstance(data, list):
            raise ConfigError(key, f"{path}: expected a list of questions")
        check_first_record(data, ["question", answer_field], path, key)
        _check_pattern(image_pattern, data[0], path)
        records += data
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    return VQADataset(records, require_dir(image_root, "image_root"), image_pattern, answer_field, vis, text)


def _check_pattern(pattern: str, record: dict, path: str) -> None:
    try:
        image_file(pattern, record)
    except SkipSample as e:
        raise ConfigError("image_pattern", f"does not fit the records of {path}: {e.detail}") from None


@DATASETS.register("coco_vqa")
def coco_vqa(ann_paths: LocalPath | list[LocalPath], image_root: LocalPath, image_pattern: str = "{image}",
             vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
             text_processor: Annotated[dict, Part(PROCESSORS)] | None = BLIP_CAPTION) -> VQADataset:
    """VQAv2 (LAVIS json: `image` relative to `image_root`, e.g. the COCO images folder)."""
    return _vqa(ann_paths, image_root, image_pattern, "answer", vis_processor, text_processor)


@DATASETS.register("ok_vqa")
def ok_vqa(ann_paths: LocalPath | list[LocalPath], image_root: LocalPath, image_pattern: str = "{image}",
           vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
           text_processor: Annotated[dict, Part(PROCESSORS)] | None = BLIP_CAPTION) -> VQADataset:
    """OK-VQA in the same LAVIS layout as VQAv2."""
    return _vqa(ann_paths, image_root, image_pattern, "answer", vis_processor, text_processor)


@DATASETS.register("aok_vqa")
def aok_vqa(ann_paths: LocalPath | list[LocalPath], image_root: LocalPath,
            image_pattern: str = "train2017/{image_id:012d}.jpg",
            vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
            text_processor: Annotated[dict, Part(PROCESSORS)] | None = BLIP_CAPTION) -> VQADataset:
    """A-OKVQA; the answer is drawn from `direct_answers`."""
    return _vqa(ann_paths, image_root, image_pattern, "direct_answers", vis_processor, text_processor)


@DATASETS.register("gqa")
def gqa(ann_paths: LocalPath | list[LocalPath], image_root: LocalPath, image_pattern: str = "{image}",
        vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
        text_processor: Annotated[dict, Part(PROCESSORS)] | None = BLIP_CAPTION) -> VQADataset:
    """GQA balanced questions (LAVIS list or the official dict)."""
    return _vqa(ann_paths, image_root, image_pattern, "answer", vis_processor, text_processor)


def _ocrvqa_records(ann_path: str, split: int) -> list[dict]:
    data = read_json(ann_path, "ann_path")
    if not isinstance(data, dict):
        raise ConfigError("ann_path", f"{ann_path}: expected OCR-VQA's dataset.json (an object keyed by image id)")
    records = []
    for image_id, book in data.items():
        if not isinstance(book, Mapping):
            raise ConfigError("ann_path", f"{ann_path}: entry '{image_id}' is not an object")
        if book.get("split") != split:
            continue
        extension = os.path.splitext(book.get("imageURL", ""))[1] or ".jpg"
        for n, (question, answer) in enumerate(zip(book.get("questions", []), book.get("answers", []))):
            records.append({"question_id": f"{image_id}_{n}", "question": question, "answer": answer,
                            "image": f"{image_id}{extension}"})
    if not records:
        raise ConfigError("ann_path", f"{ann_path}: no questions in split {split}")
    return records


@DATASETS.register("ocrvqa")
def ocrvqa(ann_path: LocalPath, image_root: LocalPath, split: int = 1,
           vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
           text_processor: Annotated[dict, Part(PROCESSORS)] | None = BLIP_CAPTION) -> VQADataset:
    """OCR-VQA book covers; `split` 1 = train, 2 = val, 3 = test."""
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    return VQADataset(_ocrvqa_records(ann_path, split), require_dir(image_root, "image_root"), "{image}",
                      "answer", vis, text)
