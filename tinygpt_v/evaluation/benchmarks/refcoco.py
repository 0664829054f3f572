"""RefCOCO / RefCOCO+ / RefCOCOg: locate the referred object; a hit is IoU >= 0.5.

The model answers `{<x1><y1><x2><y2>}` on the 0..100 grid; the box is scaled to the image size.
Two file formats:
- `annotations`: the MiniGPT-v2 evaluation json (`refcoco/refcoco_val.json`), a list of
  {img_id, sents, bbox [x, y, w, h], height, width}; the image is `<img_id first 27 chars>.jpg`;
- `refs` + `instances` + `split`: the refer toolkit's `refs(unc).p` (or a json of the same list) and
  `instances.json`; one sample per referring sentence.
Scorings (tinygpt_v.evaluation.scoring): `official` = `refcoco_official` (Acc@0.5), `original` =
`refcoco_original` (`eval_ref.py`). With `protocol: original` a MiniGPT-v2 entry gives ONE sample,
its `sents` formatted as the original does (`f"... {sents}"`, a list as its Python repr)."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import Benchmark, BenchmarkDataError, Sample, accuracy_by, read_json, read_json_list, require
from ..metrics import mean_percent
from ..original import Protocol
from ..scoring import parse_grid_box, refcoco_official, refcoco_original

PROMPT = "[refer] give me the location of {}"
COCO_NAME_LENGTH = len("COCO_train2014_000000581857")  # MiniGPT-v2 img_ids append a suffix to it


@BENCHMARKS.register("refcoco")
@dataclass(kw_only=True)
class RefCOCO(Protocol, Benchmark):
    image_root: LocalPath
    annotations: LocalPath | None = None
    refs: LocalPath | None = None
    instances: LocalPath | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        refer = [v is not None for v in (self.refs, self.instances, self.split)]
        if not ((self.annotations is not None and not any(refer)) or (self.annotations is None and all(refer))):
            raise ValueError("give either `annotations` (MiniGPT-v2 eval json) or all of `refs`, `instances` "
                             "and `split` (refer toolkit files)")

    def load(self) -> list[Sample]:
        return self._load_minigptv2() if self.annotations else self._load_refer()

    def _sample(self, id: str, image: str, sentence: str, bbox: list, width: float, height: float) -> Sample:
        return Sample(id=id, image=os.path.join(self.image_root, image),
                      prompt=self.build_prompt(PROMPT.format(sentence)),
                      target={"bbox": [float(v) for v in bbox], "width": width, "height": height})

    def _load_minigptv2(self) -> list[Sample]:
        samples = []
        for i, (where, r) in enumerate(read_json_list(self.annotations, "referring expressions")):
            sents = require(r, "sents", where, (str, list))
            image = require(r, "img_id", where, str)[:COCO_NAME_LENGTH] + ".jpg"
            one = isinstance(sents, str) or self.original_protocol  # the original formats `sents` whole
            for j, sentence in enumerate([f"{sents}"] if one else sents):
                samples.append(self._sample(f"{i}" if one else f"{i}/{j}", image, sentence,
                                            require(r, "bbox", where, list), require(r, "width", where, (int, float)),
                                            require(r, "height", where, (int, float))))
        return samples

    def _load_refer(self) -> list[Sample]:
        instances = read_json(self.instances)
        images = {img["id"]: img for img in require(instances, "images", self.instances, list)}
        boxes = {ann["id"]: ann["bbox"] for ann in require(instances, "annotations", self.instances, list)}
        samples = []
        for ref in _read_refs(self.refs):
            if ref.get("split") != self.split:
                continue
            where = f"{self.refs}: ref {ref.get('ref_id')}"
            image = images[require(ref, "image_id", where, int)]
            for sentence in require(ref, "sentences", where, list):
                samples.append(self._sample(f"{ref['ref_id']}/{sentence['sent_id']}", image["file_name"],
                                            sentence["sent"], boxes[require(ref, "ann_id", where, int)],
                                            image["width"], image["height"]))
        return samples

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        hits = [refcoco_official(row["prediction"], *_gold(row)) for row in rows]
        unparsed = [float(parse_grid_box(row["prediction"]) is None) for row in rows]
        return {"accuracy": mean_percent(hits), "answers/unparsed": mean_percent(unparsed)}

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return accuracy_by(rows, lambda row: refcoco_original(row["prediction"], *_gold(row)))


def _gold(row: dict) -> tuple[list[float], float, float]:
    target = row["target"]
    return target["bbox"], target["width"], target["height"]


class _PlainDataUnpickler(pickle.Unpickler):
    """refs(unc).p holds only lists, dicts, strings and numbers: refuse anything that needs a class,
    so a downloaded pickle cannot run code."""

    def find_class(self, module: str, name: str):
        raise BenchmarkDataError(f"refs pickle refers to {module}.{name}; only plain data is accepted")


def _read_refs(path: str) -> list[dict]:
    if path.endswith(".json"):
        refs = read_json(path)
    else:
        with open(path, "rb") as f:
            refs = _PlainDataUnpickler(f, encoding="latin1").load()
    if not isinstance(refs, list):
        raise BenchmarkDataError(f"{path}: expected a list of refs")
    return refs
