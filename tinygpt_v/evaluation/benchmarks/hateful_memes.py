"""Hateful Memes: is the meme hateful? Accuracy and AUROC from the yes/no reply.

File: a split's jsonl (`dev_seen.jsonl`, ...), one {id, img, label, text} per line;
images `<image_root>/<img>` (img is like "img/01235.png")."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, Benchmark, BenchmarkDataError, Sample, accuracy_by, clean_reply, read_jsonl,
                         require)
from ..metrics import auroc, mean_percent, parse_yes_no

# Verbatim from the original evaluation, spelling included: the prompt is part of the protocol.
PROMPT = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"


@BENCHMARKS.register("hateful_memes")
@dataclass(kw_only=True)
class HatefulMemes(Benchmark):
    annotations: LocalPath
    image_root: LocalPath

    def load(self) -> list[Sample]:
        samples = []
        for line_no, record in read_jsonl(self.annotations):
            where = f"{self.annotations}:{line_no}"
            label = require(record, "label", where, int)
            if label not in (0, 1):
                raise BenchmarkDataError(f"{where}: label should be 0 or 1, got {label}")
            samples.append(Sample(
                id=str(require(record, "id", where, (int, str))),
                image=os.path.join(self.image_root, require(record, "img", where, str)),
                prompt=IMAGE_PROMPT.format(PROMPT.format(require(record, "text", where, str))),
                target={"label": label}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        said = [parse_yes_no(clean_reply(row["prediction"])) for row in rows]  # None: neither yes nor no
        labels = [row["target"]["label"] for row in rows]
        correct = [float(answer is not None and int(answer) == label) for answer, label in zip(said, labels)]
        # An unclear reply ranks between "no" and "yes": it carries no evidence either way.
        scores = [0.5 if answer is None else float(answer) for answer in said]
        return {"accuracy": mean_percent(correct), "auroc": 100.0 * auroc(scores, labels),
                "answers/unparsed": mean_percent([float(a is None) for a in said])}

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        # "yes" anywhere -> 1, else "no" anywhere -> 0, else wrong ("not" counts as "no").
        def correct(row: dict) -> float:
            reply = clean_reply(row["prediction"])
            said = 1 if "yes" in reply else 0 if "no" in reply else None
            return float(said == row["target"]["label"])
        return accuracy_by(rows, correct)
