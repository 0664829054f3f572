"""VQAv2 and OK-VQA: the official VQA accuracy, with a breakdown by answer type.

Files: the official questions json {"questions": [{image_id, question, question_id}]} and
annotations json {"annotations": [{question_id, answers: [{answer, ...}] x10, answer_type, ...}]};
images `<image_root>/<image_pattern>` with the COCO file naming by default."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by,
                         clean_reply, read_json, require)
from ..metrics import vqa_accuracy, vqa_accuracy_original


@BENCHMARKS.register("vqav2")
@BENCHMARKS.register("okvqa")
@dataclass(kw_only=True)
class VQA(Benchmark):
    questions: LocalPath
    annotations: LocalPath
    image_root: LocalPath
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"

    def load(self) -> list[Sample]:
        questions = require(read_json(self.questions), "questions", self.questions, list)
        answers_of = self._answers_by_question()
        samples = []
        for i, q in enumerate(questions):
            where = f"{self.questions}: questions[{i}]"
            qid = require(q, "question_id", where, int)
            if qid not in answers_of:
                raise BenchmarkDataError(f"{where}: question_id {qid} has no entry in {self.annotations}")
            image = self.image_pattern.format(image_id=require(q, "image_id", where, int))
            samples.append(Sample(
                id=str(qid),
                image=os.path.join(self.image_root, image),
                prompt=IMAGE_PROMPT.format(SHORT_ANSWER.format(require(q, "question", where, str))),
                target=answers_of[qid]))
        return samples

    def _answers_by_question(self) -> dict[int, dict]:
        annotations = require(read_json(self.annotations), "annotations", self.annotations, list)
        answers_of = {}
        for i, a in enumerate(annotations):
            where = f"{self.annotations}: annotations[{i}]"
            answers = [require(x, "answer", f"{where}, answers", str) for x in require(a, "answers", where, list)]
            if not answers:
                raise BenchmarkDataError(f"{where}: no human answers to score against")
            answers_of[require(a, "question_id", where, int)] = {
                "answers": answers, "answer_type": a.get("answer_type", "unknown")}
        return answers_of

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: vqa_accuracy(clean_reply(row["prediction"]), row["target"]["answers"]),
                           group=lambda row: row["target"]["answer_type"])

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: vqa_accuracy_original(clean_reply(row["prediction"]),
                                                                   row["target"]["answers"]))
