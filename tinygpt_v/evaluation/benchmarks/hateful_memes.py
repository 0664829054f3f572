"""Hateful Memes: is the meme hateful? Accuracy and AUROC from the yes/no reply.

File: a split's jsonl (`dev_seen.jsonl`, ...), one {id, img, label, text} per line;
images `<image_root>/<img>` (img is like "img/01235.png").
Scorings: `official` = the challenge's metrics, AUROC (`scoring.roc_auc`, exact against
sklearn's `roc_auc_score`, ties included) and accuracy of the predicted label at threshold 0.5.
A generated reply gives the score 1 ("yes"), 0 ("no") or 0.5 (neither or both, `parse_yes_no`:
whole words after VQA normalisation): an unclear reply carries no evidence either way, so it
ranks between the others and, at threshold 0.5, reads as "not hateful" (`scoring.accuracy_at_half`).
`original` = `scoring.hateful_memes_original`."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import Benchmark, BenchmarkDataError, Sample, accuracy_by, clean_reply, read_jsonl, require
from ..metrics import mean_percent, parse_yes_no
from ..original import Protocol
from ..scoring import accuracy_at_half, hateful_memes_original, roc_auc

# Verbatim from the original evaluation, spelling included: the prompt is part of the protocol.
PROMPT = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"


@BENCHMARKS.register("hateful_memes")
@dataclass(kw_only=True)
class HatefulMemes(Protocol, Benchmark):
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
                prompt=self.build_prompt(PROMPT.format(require(record, "text", where, str))),
                target={"label": label}))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        said = [parse_yes_no(clean_reply(row["prediction"])) for row in rows]  # None: neither yes nor no
        labels = [row["target"]["label"] for row in rows]
        scores = [0.5 if answer is None else float(answer) for answer in said]
        return {"accuracy": 100.0 * accuracy_at_half(labels, scores), "auroc": 100.0 * roc_auc(labels, scores),
                "answers/unparsed": mean_percent([float(a is None) for a in said])}

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: hateful_memes_original(row["prediction"], row["target"]["label"]))
