"""IconQA, multiple-choice text sub-task (`choose_txt`): accuracy of the chosen option.

File: `problems.json`, a dict problem id -> {question, choices, answer (index), ques_type, split};
images `<image_root>/<split>/<ques_type>/<pid>/image.png` (the official layout) or `<image_root>/<pid>/image.png`.
As in the original, the options are ranked by the model's likelihood (`method: likelihood`);
`method: generate` asks for an answer and compares it with the correct option instead."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by,
                         clean_reply, first_existing, read_json, require)
from ..metrics import normalize_vqa_answer


@BENCHMARKS.register("iconqa")
@dataclass(kw_only=True)
class IconQA(Benchmark):
    problems: LocalPath
    image_root: LocalPath
    split: str = "test"
    ques_type: str = "choose_txt"
    method: Literal["likelihood", "generate"] = "likelihood"

    def load(self) -> list[Sample]:
        problems = read_json(self.problems)
        if not isinstance(problems, dict):
            raise BenchmarkDataError(f"{self.problems}: expected a dict problem id -> problem")
        samples = []
        for pid, problem in problems.items():
            if problem.get("split") != self.split or problem.get("ques_type") != self.ques_type:
                continue
            where = f"{self.problems}: problem {pid}"
            choices = require(problem, "choices", where, list)
            answer = require(problem, "answer", where, int)
            if not 0 <= answer < len(choices):
                raise BenchmarkDataError(f"{where}: answer index {answer} is not one of the {len(choices)} choices")
            samples.append(Sample(
                id=str(pid),
                image=first_existing([os.path.join(self.image_root, self.split, self.ques_type, pid, "image.png"),
                                      os.path.join(self.image_root, pid, "image.png")]),
                prompt=IMAGE_PROMPT.format(SHORT_ANSWER.format(require(problem, "question", where, str))),
                target={"answer": str(choices[answer]), "choices": [str(c) for c in choices]},
                candidates=tuple(str(c) for c in choices) if self.method == "likelihood" else None))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: float(normalize_vqa_answer(clean_reply(row["prediction"]))
                                                   == normalize_vqa_answer(row["target"]["answer"])))

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        # The original counts the top-ranked option when it is the answer string itself.
        return accuracy_by(rows, lambda row: float(row["prediction"] == row["target"]["answer"]))
