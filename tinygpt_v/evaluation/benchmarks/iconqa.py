"""IconQA, multiple-choice text sub-task (`choose_txt`): accuracy of the chosen option index.

File: `problems.json`, a dict problem id -> {question, choices, answer (index), ques_type, split};
images `<image_root>/<split>/<ques_type>/<pid>/image.png` (the official layout) or `<image_root>/<pid>/image.png`.
As in the original, the options are ranked by the model's likelihood (`method: likelihood`);
`method: generate` asks for an answer and takes the option equal to the (stripped) reply.
Scorings (tinygpt_v.evaluation.scoring): `official` = `iconqa_official` (chosen index == gold
index, as IconQA's `compute_test_acc`), `original` = `iconqa_original` (`eval_scripts/eval_vqa.py`:
the index in the `_`-split candidate list). With `protocol: original` the candidates ranked are
that `_`-split list and the prompt is the original's `###Human: ... ###Assistant: ` string."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by, first_existing, read_json,
                         require)
from ..original import ICONQA_INSTRUCTION, Protocol
from ..scoring import iconqa_chosen_index, iconqa_official, iconqa_original, iconqa_original_candidates


@BENCHMARKS.register("iconqa")
@dataclass(kw_only=True)
class IconQA(Protocol, Benchmark):
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
            choices = [str(c) for c in require(problem, "choices", where, list)]
            answer = require(problem, "answer", where, int)
            if not 0 <= answer < len(choices):
                raise BenchmarkDataError(f"{where}: answer index {answer} is not one of the {len(choices)} choices")
            samples.append(Sample(
                id=str(pid),
                image=first_existing([os.path.join(self.image_root, self.split, self.ques_type, pid, "image.png"),
                                      os.path.join(self.image_root, pid, "image.png")]),
                prompt=self._prompt(require(problem, "question", where, str)),
                target={"answer": answer, "choices": choices},
                candidates=self._candidates(choices) if self.method == "likelihood" else None))
        return samples

    def _prompt(self, question: str) -> str:
        instruction = SHORT_ANSWER.format(question)
        return ICONQA_INSTRUCTION.format(instruction) if self.original_protocol else self.build_prompt(instruction)

    def _candidates(self, choices: list[str]) -> tuple[str, ...]:
        return tuple(iconqa_original_candidates(choices) if self.original_protocol else choices)

    def chosen_index(self, row: dict) -> int:
        prediction = row["prediction"] if self.method == "likelihood" else row["prediction"].strip()
        return iconqa_chosen_index(prediction, row["target"]["choices"])

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: iconqa_official(self.chosen_index(row), row["target"]["answer"]))

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: iconqa_original(row["prediction"], row["target"]["choices"],
                                                             row["target"]["answer"]))
