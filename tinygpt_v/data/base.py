"""What every dataset shares: the sample contract, skipping bad input, reading annotation files.

A dataset is one of two kinds:

* `MapDataset`: a list of annotation records read at start-up; `load(index, rng)` turns one
  record into a sample (reads and processes its image, picks a prompt template).
* `StreamDataset`: webdataset tar shards read front to back; `raw_samples(...)` yields the
  undecoded tar members and `decode(raw, rng)` makes the sample. Decoding is separate so a
  resumed run can skip already-consumed samples without decoding them.

`load`/`decode` raise `SkipSample(reason, detail)` for bad input (a corrupt image, an empty
caption, ...). The loader counts the reason and moves on; a missing dataset root or an
unreadable annotation file is an error at start-up instead (`ConfigError` naming the path).

All randomness inside a sample (which prompt template, which of ten VQA answers, the crop of
an augmenting processor) comes from the `rng` argument, which the loader derives from
(seed, dataset, epoch, index): the same sample is the same on every run and after a resume.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..registry import PROCESSORS, ConfigError
from .images import SkipSample, load_image

log = logging.getLogger(__name__)

IMAGE_MARKER = "<ImageHere>"  # where the model splices the image embeddings
IMAGE_PLACEHOLDER = f"<Img>{IMAGE_MARKER}</Img>"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default for Image.MAX_IMAGE_PIXELS

__all__ = ["IMAGE_MARKER", "IMAGE_PLACEHOLDER", "MapDataset", "StreamDataset", "SkipSample", "SkipCounter",
           "image_prompt", "format_box", "sample_rng", "read_json", "read_records",
           "read_plain_pickle", "require_dir", "require_file", "build_processors"]


# --- skip accounting --------------------------------------------------------------------------

class SkipCounter:
    """Counts skipped samples per reason and logs them (every one of the first few per reason,
    then every 1000th, so a broken shard does not flood the log)."""

    LOG_FIRST = 5

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.counts: Counter[str] = Counter()
        self._muted = False

    @contextmanager
    def muted(self):
        """Ignore skips for a while (a resumed stream replaying what it already counted)."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def add(self, reason: str, detail: str = "") -> None:
        if self._muted:
            return
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.LOG_FIRST or n % 1000 == 0:
            log.warning("dataset %s: skipped sample (%s, %d so far): %s", self.dataset, reason, n, detail)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# --- prompts and boxes ------------------------------------------------------------------------

def image_prompt(instruction: str = "") -> str:
    """`<Img><ImageHere></Img> instruction`: the image goes first, as in MiniGPT-v2."""
    return f"{IMAGE_PLACEHOLDER} {instruction}".rstrip()


def format_box(box_xyxy: Sequence[float], width: int, height: int) -> str:
    """Pixel box -> `{<x1><y1><x2><y2>}` on the 0-100 grid, truncated to int as the original."""
    x1, y1, x2, y2 = box_xyxy
    grid = [x1 / width * 100, y1 / height * 100, x2 / width * 100, y2 / height * 100]
    return "{{<{}><{}><{}><{}>}}".format(*(int(v) for v in grid))


def sample_rng(seed: int, dataset: str, epoch: int, index: int) -> random.Random:
    # A str seed is hashed with sha512 by `random`, so this is stable across processes and runs.
    return random.Random(f"{seed}/{dataset}/{epoch}/{index}")


# --- dataset kinds ------------------------------------------------------------------------------

class _Dataset:
    """Shared by both kinds: a name (the `datasets:` entry), processors, the pixel limit."""

    has_images = True

    def __init__(self, vis_processor: Callable | None, text_processor: Callable | None):
        self.name = type(self).__name__
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
        self.skips = SkipCounter(self.name)

    def set_name(self, name: str) -> None:
        self.name = name
        self.skips.dataset = name

    def text(self, value: Any, what: str = "text") -> str:
        """Apply the text processor (when configured); an empty result skips the sample."""
        if not isinstance(value, str):
            raise SkipSample("bad_record", f"{what} is {type(value).__name__}, expected a string")
        out = self.text_processor(value) if self.text_processor else value.strip()
        if not out.strip():
            raise SkipSample("empty_text", f"empty {what}")
        return out

    def image(self, source: str | bytes, rng: random.Random, where: str | None = None):
        """Read + RGB-convert + process; returns (tensor, (width, height) of the original).
        `where` names the image in skip messages (default: its path)."""
        picture = load_image(source, self.max_image_pixels, where)
        return self.vis_processor(picture, rng=rng), picture.size

    def sample(self, key: str, prompt, answer, image: torch.Tensor | None = None) -> dict:
        """The sample dict; a sample the model could not take is skipped here (see check_sample_text)."""
        check_sample_text(key, prompt, answer, has_image=image is not None)
        return {"image": image, "prompt": prompt, "answer": answer, "id": str(key), "dataset": self.name}


def check_sample_text(key, prompt, answer, has_image: bool) -> None:
    """Skip (`stray_image_marker`, `missing_image_marker`) a sample whose text would break the image splice.

    The model replaces the one `<ImageHere>` of a sample's prompt by the image; an instruction,
    caption or answer that itself contains the literal marker (scraped web text, a conversation
    quoting a prompt) would make two markers, or one in a text-only sample, and `forward` would
    raise at that step, on every resume. Such samples are bad data, found here, before batching."""
    prompts, answers = _turns(key, prompt, "prompt"), _turns(key, answer, "answer")
    if len(prompts) != len(answers):
        raise SkipSample("bad_record", f"sample {key}: {len(prompts)} prompts but {len(answers)} answers")
    expected = 1 if has_image else 0
    in_prompt = sum(p.count(IMAGE_MARKER) for p in prompts)
    in_answer = sum(a.count(IMAGE_MARKER) for a in answers)
    if in_prompt == expected and not in_answer:
        return
    found = (f"sample {key}: {in_prompt} {IMAGE_MARKER} in the prompt and {in_answer} in the answer; a sample "
             f"{'with' if has_image else 'without'} an image takes {expected}, in the prompt")
    if in_prompt < expected:  # a prompt template without the marker
        raise SkipSample("missing_image_marker", found)
    raise SkipSample("stray_image_marker", f"{found} (the instruction or answer text holds the literal marker)")


def _turns(key, text, what: str) -> list[str]:
    turns = list(text) if isinstance(text, (list, tuple)) else [text]
    if not turns or not all(isinstance(t, str) for t in turns):
        raise SkipSample("bad_record", f"sample {key}: {what} must be a string or a non-empty list of strings")
    return turns


class MapDataset(_Dataset):
    """Records in memory; subclasses implement `load(index, rng) -> sample`."""

    records: list

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int, rng: random.Random) -> dict:
        raise NotImplementedError

    def load_checked(self, index: int, rng: random.Random) -> dict:
        """`load`, but a record that is not an object (see `check_first_record`) is skipped
        with its file and index, before the dataset's own code sees it."""
        record = self.records[index]
        if isinstance(record, BadRecord):
            raise SkipSample("bad_record", record.describe())
        return self.load(index, rng)


class StreamDataset(_Dataset):
    """Tar shards; subclasses implement `raw_samples` and `decode`."""

    def raw_samples(self, epoch: int, seed: int, rank: int, world_size: int) -> Iterator[dict]:
        raise NotImplementedError

    def decode(self, raw: dict, rng: random.Random) -> dict:
        raise NotImplementedError


def build_processors(vis_processor: Mapping | None, text_processor: Mapping | None,
                     default_vis: Mapping | None = None) -> tuple[Callable | None, Callable | None]:
    vis = vis_processor or default_vis
    return (PROCESSORS.build(vis, "vis_processor") if vis else None,
            PROCESSORS.build(text_processor, "text_processor") if text_processor else None)


# --- start-up checks and annotation files -----------------------------------------------------
# These raise ConfigError keyed by the builder argument; the loader prefixes `datasets.<entry>.`.

def require_dir(path: str, key: str) -> str:
    if not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(key, f"directory does not exist: {path}")
    return os.path.expanduser(path)


def require_file(path: str, key: str) -> str:
    if not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(key, f"file does not exist: {path}")
    return os.path.expanduser(path)


def read_json(path: str, key: str) -> Any:
    """A whole-file JSON document; a syntax error names file, line and column, bytes that are
    not UTF-8 the file and byte offset."""
    require_file(path, key)
    with open(os.path.expanduser(path), "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # JSON is UTF-8; a leading byte-order mark is tolerated
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path}: not UTF-8 text: byte {e.start} is 0x{data[e.start]:02x} ({e.reason}); "
                               f"JSON files must be UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_records(path: str, key: str, skips: SkipCounter) -> list:
    """A list of records (JSON objects) from `.json` (a list) or `.jsonl` (one record a line).

    In JSON-lines files a line that is not UTF-8 or does not parse is skipped and counted
    (`malformed_json`), a line holding a string, number, null or list instead of an object too
    (`bad_record`); each message names file and line. A `.json` file that does not parse is an
    error, as nothing in it can be trusted (its non-object records: see `check_first_record`)."""
    if not path.endswith(".jsonl"):
        data = read_json(path, key)
        if not isinstance(data, list):
            raise ConfigError(key, f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    with open(require_file(path, key), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                record = _json_line(raw, first=lineno == 1)
            except SkipSample as skip:
                skips.add(skip.reason, f"{path} line {lineno}: {skip.detail}")
                continue
            if record is not _BLANK:
                records.append(record)
    return records


_BLANK = object()


def _json_line(raw: bytes, first: bool) -> Any:
    """One line of a JSON-lines file -> its object (`_BLANK` for an empty line)."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("malformed_json", f"not UTF-8 text: byte {e.start} of the line is "
                                           f"0x{raw[e.start]:02x} ({e.reason})") from None
    if not line.strip():
        return _BLANK
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SkipSample("malformed_json", f"column {e.colno}: {e.msg}") from None
    if not isinstance(record, Mapping):
        raise SkipSample("bad_record", f"a JSON {_json_kind(record)} where a record (an object) belongs")
    return record


def _json_kind(value: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list",
            type(None): "null"}.get(type(value), type(value).__name__)


class BadRecord(Mapping):
    """Stands in for an annotation record that is not an object, so the list keeps its length
    (the loader's positions and a resume depend on it). An empty mapping: any dataset code that
    reads it finds no keys and skips the sample; `MapDataset.load_checked` names file and index."""

    def __init__(self, path: str, index: int, value: Any):
        self.path, self.index, self.kind = path, index, _json_kind(value)

    def describe(self) -> str:
        return f"{self.path} record {self.index}: a JSON {self.kind} where a record (an object) belongs"

    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def check_first_record(records: list, required: Sequence[str], path: str, key: str) -> None:
    """Fail at start-up when the file is not the expected format at all (checked on record 0;
    a later record missing a key is skipped as `bad_record` when drawn).

    Later records that are not objects (a string, number, null or list) are replaced, in place,
    by `BadRecord`s: skipped as `bad_record` when drawn, the message naming file and index."""
    if not records:
        raise ConfigError(key, f"{path}: no records")
    first = records[0]
    if not isinstance(first, Mapping):
        raise ConfigError(key, f"{path}: record 0 is a JSON {_json_kind(first)}, expected an object with "
                               f"key(s) {list(required)}; is this the right file?")
    missing = [k for k in required if k not in first]
    if missing:
        raise ConfigError(key, f"{path}: record 0 lacks key(s) {missing}; is this the right file?")
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            records[index] = BadRecord(path, index, record)


def require_objects(items: Sequence, path: str, key: str, what: str = "record") -> None:
    """For start-up readers that join records into their own tuples (RefCOCO refs, Visual Genome
    regions), where a placeholder cannot stand in: the first item that is not an object is an
    error naming file and index, instead of an AttributeError / TypeError from the reader."""
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"{path}: {what} {index} is a JSON {_json_kind(item)}, expected an object")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # no classes: nothing in the file can run code
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def read_plain_pickle(path: str, key: str) -> Any:
    """Read a pickle that holds only lists, dicts, strings and numbers (RefCOCO's `refs(*).p`).

    Loading an arbitrary downloaded pickle can run code; refusing every class makes it safe."""
    require_file(path, key)
    with open(os.path.expanduser(path), "rb") as f:
        try:
            return _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ConfigError(key, f"{path}: {e}") from None


def record_field(record: Mapping, field: str) -> Any:
    try:
        return record[field]
    except (KeyError, TypeError):
        raise SkipSample("bad_record", f"record lacks '{field}'") from None


def image_file(pattern: str, record: Mapping) -> str:
    """Fill an `image_pattern` such as `COCO_train2014_{image_id:012d}.jpg` from a record."""
    try:
        return pattern.format(**record)
    except (KeyError, ValueError, IndexError) as e:
        raise SkipSample("bad_record", f"image_pattern {pattern!r}: {e!r}") from None
