"""GQA (testdev-balanced): exact match after VQA answer normalisation.

File: `testdev_balanced_questions.json`, a dict question id -> {imageId, question, answer, types, ...};
images `<image_root>/<imageId>.jpg`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by,
                         clean_reply, read_json, require)
from ..metrics import normalize_vqa_answer


@BENCHMARKS.register("gqa")
@dataclass(kw_only=True)
class GQA(Benchmark):
    questions: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        questions = read_json(self.questions)
        if not isinstance(questions, dict):
            raise BenchmarkDataError(f"{self.questions}: expected a dict question id -> question")
        samples = []
        for qid, q in questions.items():
            where = f"{self.questions}: question {qid}"
            image_id = require(q, "imageId", where, str)
            samples.append(Sample(
                id=str(qid),
                image=os.path.join(self.image_root, f"{image_id}.jpg"),
                prompt=IMAGE_PROMPT.format(SHORT_ANSWER.format(require(q, "question", where, str))),
                target={"answer": require(q, "answer", where, str),
                        "type": (q.get("types") or {}).get("structural", "unknown")}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        def correct(row: dict) -> float:
            return float(normalize_vqa_answer(clean_reply(row["prediction"]))
                         == normalize_vqa_answer(row["target"]["answer"]))
        return accuracy_by(rows, correct, group=lambda row: row["target"]["type"])

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        # Correct when the label occurs anywhere in the reply: "no" is found in "not sure".
        return accuracy_by(rows, lambda row: float(row["target"]["answer"] in clean_reply(row["prediction"])))
