"""Your own data's held-out split (tinygpt_v/data/custom.py): VQA accuracy and exact match.

The entry reads the file a fine-tune trained on, in the same format (`format: qa` for
`{"image", "question", "answer"}` lines, `llava` for LLaVA conversations), and keeps the same
split (`split: heldout` with the training entry's `heldout_fraction`: the ids hashed the same
way). The prompt is the training prompt (`instruction` as in the training entry), so the model is
asked exactly as it was taught. A LLaVA conversation is scored on its first answer.

Scoring `official` reports two metrics: `accuracy`, VQA accuracy with the official scorer
(GT-Vision-Lab's vqaEval.py, `metrics.vqa_accuracy_official`) against the human answers (a `qa`
row's list of answers as they are, VQAv2 has ten; a single answer as ten identical ones, LAVIS's
convention, so a match is 100% and anything else 0%), and `exact_match`, the reply stripped and
case-folded equal to an accepted answer likewise.

Rows the data check rejects are left out and named on stderr (scripts/check_data.py reports all).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Literal

from ...data.custom import read_custom_file, sample_text
from ...registry import BENCHMARKS, LocalPath
from ..benchmark import Benchmark, BenchmarkDataError, Sample, accuracy_by
from ..metrics import vqa_accuracy_official


def exact_match(prediction: str, answers: list[str]) -> float:
    reply = prediction.strip().casefold()
    return float(any(reply == answer.strip().casefold() for answer in answers))


def human_answers(row: dict) -> list[str]:
    answers = row["target"]["answers"]
    return answers * 10 if len(answers) == 1 else answers


@BENCHMARKS.register("custom_vqa")
@dataclass(kw_only=True)
class CustomVQA(Benchmark):
    annotations: LocalPath
    image_root: LocalPath
    format: Literal["qa", "llava"] = "qa"
    split: Literal["heldout", "train", "all"] = "heldout"
    heldout_fraction: float = 0.05
    instruction: str = "{}"
    SCORINGS: ClassVar[tuple[str, ...]] = ("official",)

    def load(self) -> list[Sample]:
        try:
            source = read_custom_file(self.annotations, self.format, self.image_root, key="annotations")
        except ValueError as e:  # ConfigError: the file is not JSON / not a list
            raise BenchmarkDataError(str(e)) from None
        for problem in source.problems:
            print(f"custom_vqa: left out {problem.describe(self.annotations)}", file=sys.stderr)
        rows = source.split(self.split, self.heldout_fraction)
        if not rows:
            raise BenchmarkDataError(f"{self.annotations}: no usable rows in split {self.split!r} "
                                     f"(heldout_fraction {self.heldout_fraction})")
        samples = []
        for row in rows:
            prompt, _ = sample_text(row, self.instruction)
            first_prompt = prompt[0] if isinstance(prompt, list) else prompt
            samples.append(Sample(id=row.id, image=source.image_path(row), prompt=first_prompt,
                                  target={"answers": list(row.accepted), "line": row.line}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        vqa = accuracy_by(rows, lambda row: vqa_accuracy_official(row["prediction"], human_answers(row)))
        exact = accuracy_by(rows, lambda row: exact_match(row["prediction"], row["target"]["answers"]),
                            metric="exact_match")
        return {**vqa, **exact}
