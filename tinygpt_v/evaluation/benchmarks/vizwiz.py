"""VizWiz-VQA: accuracy over the ten human answers, and answerability, as the VizWiz-VQA API scores.

File: `val.json`, a list of {image, question, answers: [{answer, answer_confidence}], answerable,
answer_type}; images `<image_root>/<image>`. Scorings (tinygpt_v.evaluation.scoring):
`official` = `vizwiz_official` (normalised prediction against the human answers as stored;
`accuracy/<answer_type>` breakdown, "unanswerable" included) plus the API's
`evaluate_unanswerability` (`unanswerable/average_precision`, `unanswerable/f1`), the reply
read as unanswerable when it normalises to "unanswerable"; `original` = `vizwiz_original`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import Benchmark, BenchmarkDataError, Sample, accuracy_by, read_json_list, require
from ..original import Protocol
from ..scoring import vizwiz_answerable, vizwiz_official, vizwiz_original, vizwiz_unanswerability

PROMPT = ("[vqa] The question is '{}' Based on the image, answer the question with a single word or phrase. "
          "and reply 'unanswerable' when the provided information is insufficient")


@BENCHMARKS.register("vizwiz")
@dataclass(kw_only=True)
class VizWiz(Protocol, Benchmark):
    annotations: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        samples = []
        for where, record in read_json_list(self.annotations, "questions"):
            image = require(record, "image", where, str)
            answers = [require(a, "answer", f"{where}, answers", str) for a in require(record, "answers", where, list)]
            if not answers:
                raise BenchmarkDataError(f"{where}: no human answers to score against")
            answerable = record.get("answerable")
            if answerable not in (None, 0, 1):
                raise BenchmarkDataError(f"{where}: key 'answerable' should be 0 or 1, got {answerable!r}")
            samples.append(Sample(
                id=image,  # one question per image in VizWiz
                image=os.path.join(self.image_root, image),
                prompt=self.build_prompt(PROMPT.format(require(record, "question", where, str))),
                target={"answers": answers, "answer_type": record.get("answer_type", "unknown"),
                        "answerable": answerable}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        result = accuracy_by(rows, lambda row: vizwiz_official(row["prediction"], row["target"]["answers"]),
                             group=lambda row: row["target"]["answer_type"])
        gold = [row["target"].get("answerable") for row in rows]
        if rows and None not in gold and 0 in gold:  # the API's AP needs an unanswerable question
            scores = vizwiz_unanswerability(gold, [vizwiz_answerable(row["prediction"]) for row in rows])
            result.update({f"unanswerable/{name}": value for name, value in scores.items()})
        return result

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: vizwiz_original(row["prediction"], row["target"]["answers"]))
