"""VSR (Visual Spatial Reasoning), zero-shot split: is the caption true of the image?

File: the split's jsonl, one {image, caption, label (1 true / 0 false), relation, ...} per line;
images are COCO 2017 files found in `<image_root>`, `<image_root>/train2017` or `<image_root>/val2017`.
Scorings: `official` = accuracy of the true/false reading of the reply (`parse_true_false`: whole
words, true/yes vs false/no; neither or both is wrong); `original` = `scoring.vsr_original`
(root `eval_vqa.py`: the label word inside the raw reply)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (Benchmark, BenchmarkDataError, Sample, accuracy_by, clean_reply, first_existing, read_jsonl,
                         require)
from ..metrics import mean_percent, parse_true_false
from ..original import Protocol
from ..scoring import vsr_original

PROMPT = "[vqa] Based on the image, is this statement true or false? {}"


@BENCHMARKS.register("vsr")
@dataclass(kw_only=True)
class VSR(Protocol, Benchmark):
    annotations: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        samples = []
        for line_no, record in read_jsonl(self.annotations):
            where = f"{self.annotations}:{line_no}"
            image = require(record, "image", where, str)
            label = require(record, "label", where, int)
            if label not in (0, 1):
                raise BenchmarkDataError(f"{where}: label should be 1 (true) or 0 (false), got {label}")
            samples.append(Sample(
                id=str(line_no),
                image=first_existing(os.path.join(self.image_root, sub, image) for sub in ("", "train2017", "val2017")),
                prompt=self.build_prompt(PROMPT.format(require(record, "caption", where, str))),
                target={"label": label, "relation": record.get("relation", "unknown")}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        said = [parse_true_false(clean_reply(row["prediction"])) for row in rows]  # None: neither
        correct = [float(answer == bool(row["target"]["label"])) for answer, row in zip(said, rows)]
        return {"accuracy": mean_percent(correct), "answers/unparsed": mean_percent([float(a is None) for a in said])}

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: vsr_original(row["prediction"], row["target"]["label"]))
