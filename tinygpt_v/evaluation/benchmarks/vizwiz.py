"""VizWiz-VQA: VQA accuracy over the ten human answers, "unanswerable" being one of them.

File: `val.json`, a list of {image, question, answers: [{answer, answer_confidence}], answerable,
answer_type}; images `<image_root>/<image>`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, Benchmark, BenchmarkDataError, Sample, accuracy_by, clean_reply,
                         read_json_list, require)
from ..metrics import vqa_accuracy

PROMPT = ("[vqa] The question is '{}' Based on the image, answer the question with a single word or phrase. "
          "and reply 'unanswerable' when the provided information is insufficient")


@BENCHMARKS.register("vizwiz")
@dataclass(kw_only=True)
class VizWiz(Benchmark):
    annotations: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        samples = []
        for where, record in read_json_list(self.annotations, "questions"):
            image = require(record, "image", where, str)
            answers = [require(a, "answer", f"{where}, answers", str) for a in require(record, "answers", where, list)]
            if not answers:
                raise BenchmarkDataError(f"{where}: no human answers to score against")
            samples.append(Sample(
                id=image,  # one question per image in VizWiz
                image=os.path.join(self.image_root, image),
                prompt=IMAGE_PROMPT.format(PROMPT.format(require(record, "question", where, str))),
                target={"answers": answers, "answer_type": record.get("answer_type", "unknown")}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: vqa_accuracy(clean_reply(row["prediction"]), row["target"]["answers"]),
                           group=lambda row: row["target"]["answer_type"])

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        # The original counts a human answer when it equals the reply or either contains the other,
        # without leave-one-out; an empty reply is inside every answer and scores 100 %.
        def lenient(row: dict) -> float:
            reply = clean_reply(row["prediction"])
            count = sum(1 for a in row["target"]["answers"] if a.lower() in reply or reply in a.lower())
            return min(count / 3, 1.0)
        return accuracy_by(rows, lenient)
