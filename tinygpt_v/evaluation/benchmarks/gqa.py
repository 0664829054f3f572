"""GQA (testdev-balanced): exact match with the gold answer, as GQA's own `eval.py` scores.

File: `testdev_balanced_questions.json`, a dict question id -> {imageId, question, answer, types,
isBalanced, ...}; images `<image_root>/<imageId>.jpg`. As `eval.py`, only balanced questions
count (a question without `isBalanced` is kept). Scorings (tinygpt_v.evaluation.scoring):
`official` = `gqa_official` (raw prediction == answer; `accuracy/binary|open` split as eval.py,
"open" being structural type "query"), `original` = `gqa_original` (label inside the reply)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by, read_json, require
from ..original import Protocol
from ..scoring import gqa_official, gqa_original


@BENCHMARKS.register("gqa")
@dataclass(kw_only=True)
class GQA(Protocol, Benchmark):
    questions: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        questions = read_json(self.questions)
        if not isinstance(questions, dict):
            raise BenchmarkDataError(f"{self.questions}: expected a dict question id -> question")
        samples = []
        for qid, q in questions.items():
            where = f"{self.questions}: question {qid}"
            if isinstance(q, dict) and q.get("isBalanced", True) is False:
                continue  # eval.py scores the balanced questions only
            image_id = require(q, "imageId", where, str)
            structural = (q.get("types") or {}).get("structural", "unknown")
            samples.append(Sample(
                id=str(qid),
                image=os.path.join(self.image_root, f"{image_id}.jpg"),
                prompt=self.build_prompt(SHORT_ANSWER.format(require(q, "question", where, str))),
                target={"answer": require(q, "answer", where, str), "type": structural}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: gqa_official(row["prediction"], row["target"]["answer"]),
                           group=lambda row: "open" if row["target"]["type"] == "query" else "binary")

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: gqa_original(row["prediction"], row["target"]["answer"]))
