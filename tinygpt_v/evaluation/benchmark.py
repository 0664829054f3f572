"""What every benchmark is: samples read from its official files, and scores of predictions.

A benchmark is a dataclass registered in `BENCHMARKS`; its fields are the YAML keys of its
entry under `evaluation.benchmarks` (the registry checks them at load time). It turns its files
into `Sample`s (image path, prompt, ground truth) and scores prediction rows
`{"id", "prompt", "prediction", "target"}` two ways:
- `score_official`: the benchmark's own metric (reported first);
- `score_original`: the lenient scoring of the original TinyGPT-V evaluation script, so numbers
  can be compared with the paper's table.
Scores are percentages. A metric name with a "/" (e.g. "accuracy/yes/no") is a breakdown:
written to the summary JSON, left out of the printed table.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from .metrics import mean_percent

IMAGE_SLOT = "<Img><ImageHere></Img>"  # where the model splices the image embeddings
IMAGE_PROMPT = IMAGE_SLOT + " {}"
# The instruction of the original's VQA-style benchmarks (GQA, OK-VQA, IconQA; VQAv2 shares it).
SHORT_ANSWER = "[vqa] Based on the image, respond to this question with a short answer: {}"


class BenchmarkDataError(ValueError):
    """A benchmark file that does not have the expected format; names file, line/entry and key."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: str | None  # path of the image file
    prompt: str  # raw instruction with <ImageHere>; the model applies its chat template
    target: Any  # JSON-serialisable ground truth, stored beside the prediction
    candidates: tuple[str, ...] | None = None  # set: rank these by likelihood instead of generating


@dataclass(kw_only=True)
class Benchmark:
    batch_size: int | None = None  # None: evaluation.batch_size
    max_new_tokens: int | None = None  # None: evaluation.max_new_tokens
    limit: int | None = None  # evaluate only the first `limit` samples (smoke runs)

    def samples(self) -> list[Sample]:
        samples = self.load()
        seen: set[str] = set()
        for sample in samples:
            if sample.id in seen:
                raise BenchmarkDataError(f"{type(self).__name__}: sample id {sample.id!r} occurs twice")
            seen.add(sample.id)
        return samples[: self.limit] if self.limit is not None else samples

    # The scorings this benchmark offers, the default first; `score(rows, name)` calls
    # `score_<name>`. A benchmark with more (e.g. VQA's "evalai") lists them here.
    SCORINGS: ClassVar[tuple[str, ...]] = ("official", "original")

    def score(self, rows: list[dict], scoring: str) -> dict[str, float]:
        if scoring not in self.SCORINGS:
            raise ValueError(f"{type(self).__name__} has no scoring {scoring!r}; it offers: {', '.join(self.SCORINGS)}")
        return getattr(self, f"score_{scoring}")(rows)

    def has_ground_truth(self) -> bool:
        """False for a test split without answers: it is predicted but not scored."""
        return True

    def write_outputs(self, rows: list[dict], output_dir: str, name: str) -> list[str]:
        """Files besides the predictions a run of entry `name` writes (e.g. a challenge
        submission); their paths."""
        return []

    # --- what a benchmark module writes ---
    def load(self) -> list[Sample]:
        raise NotImplementedError

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        raise NotImplementedError


# --- shared helpers -----------------------------------------------------------------------------

def clean_reply(text: str) -> str:
    """A reply tidied for our yes/no and true/false readers (Hateful Memes and VSR `official`):
    drop <unk>, cut at '###', keep what follows 'Assistant:', lower-case, strip.

    Not the original's clean-up: each original script has its own, in its own order (GQA and VSR
    search the raw reply, VizWiz and Hateful Memes cut case-sensitively before lower-casing, RefCOCO
    removes spaces); those live in tinygpt_v.evaluation.scoring."""
    text = text.replace("<unk>", "").split("###")[0].split("Assistant:")[-1]
    return text.strip().lower()


def accuracy_by(rows: list[dict], per_row: Callable[[dict], float], group: Callable[[dict], str] | None = None,
                metric: str = "accuracy") -> dict[str, float]:
    """Mean of a per-row score (percent), plus `metric/<group>` breakdowns when `group` is given."""
    scores = [per_row(row) for row in rows]
    result = {metric: mean_percent(scores)}
    if group is not None:
        groups: dict[str, list[float]] = defaultdict(list)
        for row, score in zip(rows, scores):
            groups[str(group(row))].append(score)
        result.update({f"{metric}/{name}": mean_percent(values) for name, values in sorted(groups.items())})
    return result


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def read_json_list(path: str, what: str) -> list[tuple[str, Any]]:
    """(where, record) for each entry of a JSON file holding a list of `what`; `where` names the
    file and the entry for error messages."""
    records = read_json(path)
    if not isinstance(records, list):
        raise BenchmarkDataError(f"{path}: expected a list of {what}")
    return [(f"{path}: entry {i}", record) for i, record in enumerate(records)]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-empty line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{line_no}: not valid JSON: {e.msg}") from None
    return records


def require(record: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """record[key], or a BenchmarkDataError naming where the record is and what is missing."""
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise BenchmarkDataError(f"{where}: missing key '{key}' (keys: {', '.join(sorted(record))})")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BenchmarkDataError(f"{where}: key '{key}' should be {names}, got {value!r}")
    return value


def first_existing(paths: Iterable[str]) -> str:
    """The first path that exists, else the first one (so a later error names the expected file)."""
    paths = list(paths)
    return next((p for p in paths if os.path.exists(p)), paths[0])
