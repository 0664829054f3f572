"""VQA in the LAVIS / MiniGPT-4 annotation layout: VQA accuracy.

File: a list of {question_id, question, answer (a list of human answers, or one string), image};
images `<image_root>/<image>`. The toy world's held-out questions use it, so the offline demo
model is scored by the same runner as the real benchmarks. `prompt` is the instruction the model
was trained with ({} is the question). Scorings and `protocol` as for VQAv2 / OK-VQA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import SHORT_ANSWER, Benchmark, Sample, read_json_list, require
from ..original import Protocol
from .vqa import VQAScorings


@BENCHMARKS.register("lavis_vqa")
@dataclass(kw_only=True)
class LavisVQA(VQAScorings, Protocol, Benchmark):
    annotations: LocalPath
    image_root: LocalPath
    prompt: str = SHORT_ANSWER

    def load(self) -> list[Sample]:
        samples = []
        for where, record in read_json_list(self.annotations, "questions"):
            answers = require(record, "answer", where, (list, str))
            samples.append(Sample(
                id=str(require(record, "question_id", where, (int, str))),
                image=os.path.join(self.image_root, require(record, "image", where, str)),
                prompt=self.build_prompt(self.prompt.format(require(record, "question", where, str))),
                target={"answers": [answers] if isinstance(answers, str) else answers}))
        return samples
