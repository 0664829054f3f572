"""RefCOCO / RefCOCO+ / RefCOCOg: locate the referred object; a hit is IoU >= 0.5.

The model answers `{<x1><y1><x2><y2>}` on the 0..100 grid; the box is scaled to the image size.
Two file formats:
- `annotations`: the MiniGPT-v2 evaluation json (`refcoco/refcoco_val.json`), a list of
  {img_id, sents, bbox [x, y, w, h], height, width}; the image is `<img_id first 27 chars>.jpg`;
- `refs` + `instances` + `split`: the refer toolkit's `refs(unc).p` (or a json of the same list) and
  `instances.json`; one sample per referring sentence."""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import (IMAGE_PROMPT, Benchmark, BenchmarkDataError, Sample, accuracy_by, read_json,
                         read_json_list, require)
from ..metrics import box_iou, box_iou_original, grid_to_pixels, mean_percent, parse_grid_box

PROMPT = "[refer] give me the location of {}"
COCO_NAME_LENGTH = len("COCO_train2014_000000581857")  # MiniGPT-v2 img_ids append a suffix to it


@BENCHMARKS.register("refcoco")
@dataclass(kw_only=True)
class RefCOCO(Benchmark):
    image_root: LocalPath
    annotations: LocalPath | None = None
    refs: LocalPath | None = None
    instances: LocalPath | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        refer = [v is not None for v in (self.refs, self.instances, self.split)]
        if not ((self.annotations is not None and not any(refer)) or (self.annotations is None and all(refer))):
            raise ValueError("give either `annotations` (MiniGPT-v2 eval json) or all of `refs`, `instances` "
                             "and `split` (refer toolkit files)")

    def load(self) -> list[Sample]:
        return self._load_minigptv2() if self.annotations else self._load_refer()

    def _sample(self, id: str, image: str, sentence: str, bbox: list, width: float, height: float) -> Sample:
        return Sample(id=id, image=os.path.join(self.image_root, image),
                      prompt=IMAGE_PROMPT.format(PROMPT.format(sentence)),
                      target={"bbox": [float(v) for v in bbox], "width": width, "height": height})

    def _load_minigptv2(self) -> list[Sample]:
        samples = []
        for i, (where, r) in enumerate(read_json_list(self.annotations, "referring expressions")):
            sents = require(r, "sents", where, (str, list))
            image = require(r, "img_id", where, str)[:COCO_NAME_LENGTH] + ".jpg"
            for j, sentence in enumerate([sents] if isinstance(sents, str) else sents):
                samples.append(self._sample(f"{i}" if isinstance(sents, str) else f"{i}/{j}", image, sentence,
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
        boxes = [parse_grid_box(row["prediction"]) for row in rows]  # None: no box on the grid
        hits = [float(box is not None and box_iou(_pixels(box, row), _target_corners(row)) >= 0.5)
                for box, row in zip(boxes, rows)]
        return {"accuracy": mean_percent(hits), "answers/unparsed": mean_percent([float(b is None) for b in boxes])}

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        # The reply, spaces removed, must start with the box; the first four numbers are the box,
        # compared with inclusive-pixel IoU and a strict > 0.5.
        def hit(row: dict) -> float:
            reply = row["prediction"].replace("<unk>", "").replace(" ", "").strip()
            if not re.match(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}", reply):
                return 0.0
            box = [int(v) for v in re.findall(r"\d+", reply)[:4]]
            return float(box_iou_original(_pixels(box, row), _target_corners(row)) > 0.5)
        return accuracy_by(rows, hit)


def _pixels(grid_box, row: dict) -> list[float]:
    return grid_to_pixels(grid_box, row["target"]["width"], row["target"]["height"])


def _target_corners(row: dict) -> list[float]:
    x, y, w, h = row["target"]["bbox"]
    return [x, y, x + w, y + h]


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
