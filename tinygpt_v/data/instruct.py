"""Instruction data: LLaVA-Instruct-150k, MiniGPT-v2's multitask conversation, Unnatural Instructions.

LLaVA files (`conversation_58k.json`, `detail_23k.json`, `complex_reasoning_77k.json`) and
`multitask_conversation.json` are lists of
  {"id": "000000215677", "image": "000000215677.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}, ...]}
Text is built as the original's `llava_dataset.py` / `multitask_conversation.py` build it:
the first question loses its `<image>` tag and every newline, is stripped and becomes
`<Img><ImageHere></Img> {question} ` (trailing space); later questions get a trailing space;
answers are used exactly as written. Conversations become multi-turn samples (one prompt and
one answer per turn); detail and reasoning use their first turn, and only there does the
text processor (`blip_caption` in the paper's configs) clean the question, as the original.

Unnatural Instructions (`core_data.jsonl`, or a JSON list of the same records) is text only:
  {"instruction": ..., "instances": [{"instruction_with_input", "constraints", "output"}]}
"""
from __future__ import annotations

import os
import random
from typing import Annotated

from ..registry import DATASETS, PROCESSORS, LocalPath, Part
from .base import (MapDataset, SkipSample, build_processors, check_first_record, image_file, read_records,
                   record_field, require_dir)
from .prompts import image_instruction

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 448}


def as_written(value, what: str = "text") -> str:
    """Text used exactly as the file has it (the original applies no processor there);
    a missing or blank value still skips the sample."""
    if not isinstance(value, str):
        raise SkipSample("bad_record", f"{what} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise SkipSample("empty_text", f"empty {what}")
    return value


class ConversationDataset(MapDataset):
    def __init__(self, records, image_root, image_pattern, multi_turn, vis, text):
        super().__init__(vis, text)
        self.records, self.image_root, self.image_pattern = records, image_root, image_pattern
        self.multi_turn = multi_turn

    def load(self, index: int, rng: random.Random) -> dict:
        record = self.records[index]
        questions, answers = self._turns(record_field(record, "conversations"))
        first = as_written(questions[0].replace("<image>", "").replace("\n", "").strip(), "first question")
        path = os.path.join(self.image_root, image_file(self.image_pattern, record))
        image, _ = self.image(path, rng)
        if not self.multi_turn:  # llava_detail / llava_reason: the processor cleans the question
            question = self.text(first, "question") if self.text_processor else first
            return self.sample(record.get("id", index), image_instruction(question),
                               as_written(answers[0], "answer"), image)
        questions = [image_instruction(first)] + [as_written(q, "question") + " " for q in questions[1:]]
        answers = [as_written(a, "answer") for a in answers]
        if self.text_processor:  # not in the original; applied only when a config asks for it
            questions = [questions[0]] + [self.text(q, "question") for q in questions[1:]]
            answers = [self.text(a, "answer") for a in answers]
        return self.sample(record.get("id", index), questions, answers, image)

    @staticmethod
    def _turns(conversation) -> tuple[list[str], list[str]]:
        """human/gpt alternation -> (questions, answers); a trailing question is dropped."""
        if not isinstance(conversation, list) or len(conversation) < 2:
            raise SkipSample("bad_record", "conversation needs at least one question and answer")
        questions, answers = [], []
        for i, turn in enumerate(conversation[: len(conversation) // 2 * 2]):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            expected = ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
            if speaker not in expected:
                raise SkipSample("bad_record", f"turn {i} is from {speaker!r}, expected {expected[0]!r}")
            value = turn.get("value")
            if not isinstance(value, str):
                raise SkipSample("bad_record", f"turn {i} has no text value")
            (questions if i % 2 == 0 else answers).append(value)
        return questions, answers


def _conversations(ann_path, image_root, image_pattern, multi_turn, vis_processor, text_processor):
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    dataset = ConversationDataset(None, require_dir(image_root, "image_root"), image_pattern, multi_turn, vis, text)
    dataset.records = read_records(ann_path, "ann_path", dataset.skips)
    check_first_record(dataset.records, ["conversations"], ann_path, "ann_path")
    return dataset


@DATASETS.register("llava_conversation")
def llava_conversation(ann_path: LocalPath, image_root: LocalPath, image_pattern: str = "{image}",
                       vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                       text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> ConversationDataset:
    """LLaVA conversations, every turn. `image_pattern` is filled from the record: `{image}`
    (the json's file name) or the original's `COCO_train2014_{id}.jpg`."""
    return _conversations(ann_path, image_root, image_pattern, True, vis_processor, text_processor)


@DATASETS.register("llava_detail")
def llava_detail(ann_path: LocalPath, image_root: LocalPath, image_pattern: str = "{image}",
                 vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                 text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> ConversationDataset:
    """LLaVA detailed descriptions (first turn)."""
    return _conversations(ann_path, image_root, image_pattern, False, vis_processor, text_processor)


@DATASETS.register("llava_reason")
def llava_reason(ann_path: LocalPath, image_root: LocalPath, image_pattern: str = "{image}",
                 vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                 text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> ConversationDataset:
    """LLaVA complex reasoning (first turn)."""
    return _conversations(ann_path, image_root, image_pattern, False, vis_processor, text_processor)


@DATASETS.register("multitask_conversation")
def multitask_conversation(ann_path: LocalPath, image_root: LocalPath, image_pattern: str = "{image}",
                           vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
                           text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> ConversationDataset:
    """MiniGPT-v2's multi-task conversations, every turn."""
    return _conversations(ann_path, image_root, image_pattern, True, vis_processor, text_processor)


class UnnaturalInstructions(MapDataset):
    has_images = False

    def __init__(self, records, text):
        super().__init__(None, text)
        self.records = records

    def load(self, index: int, rng: random.Random) -> dict:
        instances = record_field(self.records[index], "instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise SkipSample("bad_record", f"record {index}: 'instances' is not a non-empty list")
        instance = instances[0]
        instruction = record_field(instance, "instruction_with_input")
        constraints = instance.get("constraints")
        if constraints is not None:  # as the original: even an empty constraint adds the space
            instruction = f"{instruction} {constraints}"
        answer = record_field(instance, "output")
        return self.sample(index, self.text(instruction, "instruction"), self.text(answer, "output"))


@DATASETS.register("unnatural_instruction")
def unnatural_instruction(ann_path: LocalPath,
                          text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> UnnaturalInstructions:
    """Text-only instructions; `.jsonl` (core_data.jsonl as released) or a `.json` list."""
    _, text = build_processors(None, text_processor)
    dataset = UnnaturalInstructions(None, text)
    dataset.records = read_records(ann_path, "ann_path", dataset.skips)
    check_first_record(dataset.records, ["instances"], ann_path, "ann_path")
    return dataset
