"""Your own data for fine-tuning: two file formats, one check of every row, a held-out split.

Formats (a `.jsonl` file holds one record a line; a `.json` file a list of records):

* `llava_json`: LLaVA's conversations, multi-turn, as LLaVA-Instruct and most VLM tools write them
      {"id": "0001", "image": "cat.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhat animal is this?"},
                         {"from": "gpt", "value": "A cat."},
                         {"from": "human", "value": "What colour is it?"},
                         {"from": "gpt", "value": "Black."}]}
  `<image>` belongs in the first human turn only (where it is written does not matter: the
  image always comes first, as in the original's LLaVA loader); turns alternate human/gpt
  (`user`/`assistant` are accepted too). Text is built as `llava_conversation` builds it
  (tinygpt_v/data/instruct.py): first question without `<image>` and newlines, later questions
  with a trailing space, answers as written.
* `qa_jsonl`: one question and its answer per image
      {"image": "cat.jpg", "question": "What animal is this?", "answer": "A cat."}
  `id` is optional; `answer` may be a list of accepted answers (the first is trained, all
  count in VQA accuracy).

Both give the stage-4 sample `<Img><ImageHere></Img> {instruction} ` -> answer, where
`instruction` is the builder's `instruction` pattern filled with the question (default "{}";
"[vqa] {}" adds MiniGPT-v2's VQA task tag).

Held-out split. `split: train | heldout | all` picks rows by a hash of the sample id (the
record's `id`, else its image and first question), so the same file gives the same split on
every machine and run, whatever the row order; `heldout_fraction` of the ids are held out.
The `custom_vqa` benchmark (tinygpt_v/evaluation/benchmarks/custom.py) reads the same split.

Checks. Every row is checked when the dataset is built: fields present and strings, answers
and questions not empty, `<image>` only where it belongs, no literal `<ImageHere>`, the image
file present, no duplicate sample and no id used twice. A bad row is left out and counted
(never silently): `dataset.problems` lists them with their line numbers. `preflight(datasets,
model=...)` adds what needs more than the file: images that do not open (header only, or a full
decode with `full=True`) and samples longer than `model.max_txt_len` in the model's tokens, and
refuses a dataset whose bad rows exceed its `max_bad_fraction` (default 0.5). The trainer calls
it on the built datasets (tinygpt_v/training/preflight.py), and `scripts/check_data.py` prints
the full report without building a model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

from PIL import Image, UnidentifiedImageError

from ..registry import DATASETS, PROCESSORS, Bound, ConfigError, LocalPath, Part
from .base import IMAGE_MARKER, MapDataset, SkipSample, build_processors, require_dir, require_file
from .images import load_image
from .prompts import image_instruction

log = logging.getLogger(__name__)

DEFAULT_VIS = {"name": "blip2_image_train", "image_size": 448}
LLAVA_MARKER = "<image>"
Split = Literal["train", "heldout", "all"]
HeldoutFraction = Annotated[float, Bound(ge=0, le=1)]
BadFraction = Annotated[float, Bound(ge=0, le=1)]

# What can be wrong with a row (the report's vocabulary).
PROBLEMS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "missing_field": "a required field is missing or not text",
    "empty_question": "a question is empty",
    "empty_answer": "an answer is empty",
    "bad_conversation": "the conversation does not alternate human/gpt turns",
    "image_marker": "<image> (or <ImageHere>) in the wrong place",
    "missing_image": "the image file is not there",
    "unreadable_image": "the image file does not open as an image",
    "too_long": "longer than model.max_txt_len tokens (the answer would be cut)",
    "duplicate": "the same image and text as an earlier row",
    "duplicate_id": "an id an earlier row already uses",
}


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line of the file where the record starts
    kind: str  # a key of PROBLEMS
    detail: str

    def describe(self, path: str) -> str:
        return f"{path}:{self.line}: {self.kind}: {self.detail}"


@dataclass
class Row:
    """One good sample of the file."""
    line: int
    id: str
    image: str  # file name as written, relative to image_root
    questions: list[str]  # per turn, as written (the first without <image>)
    answers: list[str]  # per turn; the first answer of a qa row with several accepted answers
    accepted: list[str] = field(default_factory=list)  # every accepted answer of the first turn

    @property
    def content_key(self) -> tuple:
        return (self.image, tuple(self.questions), tuple(self.answers))


class BadRow(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


# --- reading records with their line numbers ---------------------------------------------------

def read_numbered_records(path: str, key: str) -> tuple[list[tuple[int, object]], list[Problem]]:
    """[(line, record)] from a `.jsonl` (one a line) or `.json` (a list) file, and the lines of a
    `.jsonl` that do not parse. A `.json` file that does not parse at all is a ConfigError."""
    require_file(path, key)
    with open(os.path.expanduser(path), "rb") as f:
        data = f.read()
    if path.endswith(".jsonl"):
        return _jsonl_records(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path}: not UTF-8 text (byte {e.start}); JSON files must be UTF-8") from None
    return _json_list_records(text, path, key), []


def _jsonl_records(data: bytes) -> tuple[list[tuple[int, object]], list[Problem]]:
    records, problems = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(lineno, "malformed_json", f"not UTF-8 text (byte {e.start} of the line)"))
            continue
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(lineno, "malformed_json", f"column {e.colno}: {e.msg}"))
    return records, problems


def _json_list_records(text: str, path: str, key: str) -> list[tuple[int, object]]:
    """Each element of the top-level list with the line it starts on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ConfigError(key, f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    decoder, records = json.JSONDecoder(), []
    pos = text.index("[") + 1
    for _ in data:  # walk the text once more, only to learn where each element starts
        while text[pos] in " \t\r\n,":
            pos += 1
        value, end = decoder.raw_decode(text, pos)
        records.append((text.count("\n", 0, pos) + 1, value))
        pos = end
    return records


# --- one record -> one row ---------------------------------------------------------------------

def _text(record: Mapping, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        missing = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise BadRow("missing_field", f"'{name}' is {missing}")
    return value


def _no_image_here(text: str, where: str) -> None:
    if IMAGE_MARKER in text:
        raise BadRow("image_marker", f"{where} holds the literal {IMAGE_MARKER}, which marks where the model "
                                     f"puts the image; remove it")


def parse_qa(line: int, record) -> Row:
    """A `{"image", "question", "answer"[, "id"]}` record -> Row (BadRow when it is not usable)."""
    if not isinstance(record, Mapping):
        raise BadRow("not_an_object", f"a JSON {type(record).__name__} where a record belongs")
    image, question = _text(record, "image"), _text(record, "question")
    answer = record.get("answer")
    accepted = answer if isinstance(answer, list) else [answer]
    if not accepted or not all(isinstance(a, str) for a in accepted):
        raise BadRow("missing_field", "'answer' is missing or not text (a string or a list of strings)")
    if question.lstrip().startswith(LLAVA_MARKER):  # LLaVA habit: "<image>\n..." means "image first"
        question = question.lstrip()[len(LLAVA_MARKER):]
    if LLAVA_MARKER in question or any(LLAVA_MARKER in a for a in accepted):
        raise BadRow("image_marker", f"{LLAVA_MARKER} inside the text (only allowed at the start of the question; "
                                     f"the image always comes first)")
    for text, where in [(question, "the question")] + [(a, "the answer") for a in accepted]:
        _no_image_here(text, where)
    if not question.strip():
        raise BadRow("empty_question", "the question is empty")
    if not all(a.strip() for a in accepted):
        raise BadRow("empty_answer", "the answer is empty")
    sample_id = str(record["id"]) if record.get("id") is not None else f"{image}|{question.strip()}"
    return Row(line, sample_id, image, [question.strip()], [accepted[0]], list(accepted))


def parse_llava(line: int, record) -> Row:
    """A LLaVA `{"id", "image", "conversations"}` record -> Row."""
    if not isinstance(record, Mapping):
        raise BadRow("not_an_object", f"a JSON {type(record).__name__} where a record belongs")
    image = _text(record, "image")
    conversation = record.get("conversations")
    if not isinstance(conversation, list):
        raise BadRow("missing_field", "'conversations' is missing or not a list")
    questions, answers = _llava_turns(conversation)
    first = questions[0]
    if first.count(LLAVA_MARKER) > 1:
        raise BadRow("image_marker", f"{LLAVA_MARKER} occurs {first.count(LLAVA_MARKER)} times in the first question")
    first = first.replace(LLAVA_MARKER, "").replace("\n", "").strip()  # as the original's llava loader
    questions = [first] + questions[1:]
    for turn, text in enumerate(questions):
        if not text.strip():
            raise BadRow("empty_question", f"question {turn + 1} is empty")
    for turn, text in enumerate(answers):
        if not text.strip():
            raise BadRow("empty_answer", f"answer {turn + 1} is empty")
    sample_id = str(record["id"]) if record.get("id") is not None else f"{image}|{first}"
    return Row(line, sample_id, image, questions, answers, [answers[0]])


def _llava_turns(conversation: list) -> tuple[list[str], list[str]]:
    if len(conversation) < 2:
        raise BadRow("bad_conversation", "needs at least one human and one gpt turn")
    if len(conversation) % 2:
        raise BadRow("bad_conversation", f"{len(conversation)} turns: the last question has no answer")
    questions, answers = [], []
    for i, turn in enumerate(conversation):
        expected = ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        if speaker not in expected:
            raise BadRow("bad_conversation", f"turn {i + 1} is from {speaker!r}, expected {expected[0]!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise BadRow("missing_field", f"turn {i + 1} has no text 'value'")
        _no_image_here(value, f"turn {i + 1}")
        if LLAVA_MARKER in value and i > 0:
            raise BadRow("image_marker", f"{LLAVA_MARKER} in turn {i + 1} ({speaker}); it belongs in the first "
                                         f"human turn only")
        (questions if i % 2 == 0 else answers).append(value)
    return questions, answers


PARSERS = {"qa": parse_qa, "llava": parse_llava}


# --- the whole file ------------------------------------------------------------------------------

def in_heldout(sample_id: str, fraction: float) -> bool:
    """Whether a sample id falls in the held-out share: sha1 of the id as a number in [0, 1)."""
    value = int(hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:15], 16) / 16 ** 15
    return value < fraction


def in_split(sample_id: str, split: str, fraction: float) -> bool:
    return split == "all" or in_heldout(sample_id, fraction) == (split == "heldout")


@dataclass
class CustomFile:
    """Every row of one file, good or bad."""
    path: str
    format: str
    image_root: str
    rows: list[Row]
    problems: list[Problem]
    total: int  # records (lines) in the file, good and bad

    def split(self, split: str, fraction: float) -> list[Row]:
        return [row for row in self.rows if in_split(row.id, split, fraction)]

    def image_path(self, row: Row) -> str:
        return os.path.join(self.image_root, row.image)


def read_custom_file(path: str, fmt: str, image_root: str, key: str = "ann_path") -> CustomFile:
    """Read and check every record: fields, markers, duplicates, that the image file exists."""
    records, problems = read_numbered_records(path, key)
    parse = PARSERS[fmt]
    rows: list[Row] = []
    first_of_content: dict[tuple, int] = {}
    first_of_id: dict[str, int] = {}
    for line, record in records:
        try:
            row = parse(line, record)
            _check_unique(row, first_of_content, first_of_id)
            if not os.path.isfile(os.path.join(image_root, row.image)):
                raise BadRow("missing_image", f"{os.path.join(image_root, row.image)} does not exist")
        except BadRow as bad:
            problems.append(Problem(line, bad.kind, bad.detail))
            continue
        rows.append(row)
    problems.sort(key=lambda p: p.line)
    return CustomFile(path, fmt, image_root, rows, problems, total=len(records) + _unparsed(problems))


def _unparsed(problems: list[Problem]) -> int:
    return sum(p.kind == "malformed_json" for p in problems)


def _check_unique(row: Row, first_of_content: dict, first_of_id: dict) -> None:
    if row.content_key in first_of_content:
        raise BadRow("duplicate", f"same image and text as line {first_of_content[row.content_key]}")
    if row.id in first_of_id:
        raise BadRow("duplicate_id", f"id {row.id!r} already used on line {first_of_id[row.id]}")
    first_of_content[row.content_key] = row.line
    first_of_id[row.id] = row.line


def sample_text(row: Row, instruction: str = "{}") -> tuple[str | list[str], str | list[str]]:
    """(prompt, answer) as the model trains on them: one string each for one turn, per-turn
    lists for a conversation (later questions with the trailing space of instruct.py)."""
    first = image_instruction(instruction.format(row.questions[0]))
    if len(row.questions) == 1:
        return first, row.answers[0]
    return [first] + [q + " " for q in row.questions[1:]], list(row.answers)


# --- the dataset -----------------------------------------------------------------------------------

class CustomDataset(MapDataset):
    """The rows of one split of a custom file; `source` keeps the whole file's report."""

    def __init__(self, source: CustomFile, split: str, heldout_fraction: float, instruction: str,
                 max_bad_fraction: float, vis, text):
        super().__init__(vis, text)
        self.source, self.split_name, self.instruction = source, split, instruction
        self.max_bad_fraction = max_bad_fraction
        self.records = source.split(split, heldout_fraction)

    def load(self, index: int, rng: random.Random) -> dict:
        row = self.records[index]
        image, _ = self.image(self.source.image_path(row), rng)
        prompt, answer = sample_text(row, self.instruction)
        if self.text_processor:  # not by default: answers are trained as written
            answer = [self.text(a, "answer") for a in answer] if isinstance(answer, list) else self.text(answer)
        return self.sample(row.id, prompt, answer, image)


def _build(fmt: str, ann_path: str, image_root: str, split: str, heldout_fraction: float, instruction: str,
           max_bad_fraction: float, vis_processor, text_processor) -> CustomDataset:
    if "{}" not in instruction:
        raise ConfigError("instruction", f"{instruction!r} has no {{}} for the question")
    vis, text = build_processors(vis_processor, text_processor, DEFAULT_VIS)
    source = read_custom_file(ann_path, fmt, require_dir(image_root, "image_root"))
    dataset = CustomDataset(source, split, heldout_fraction, instruction, max_bad_fraction, vis, text)
    # counted in the run's health summary; preflight logs (or refuses with) the report by line
    dataset.skips.counts.update(problem.kind for problem in source.problems)
    if not dataset.records:
        raise ConfigError("ann_path", f"{ann_path}: no usable rows in split {split!r} ({len(source.rows)} good, "
                                      f"{len(source.problems)} bad of {source.total}); "
                                      f"run scripts/check_data.py for the report")
    return dataset


@DATASETS.register("llava_json")
def llava_json(ann_path: LocalPath, image_root: LocalPath, split: Split = "train",
               heldout_fraction: HeldoutFraction = 0.05, instruction: str = "{}",
               max_bad_fraction: BadFraction = 0.5,
               vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
               text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> CustomDataset:
    """Your LLaVA-format conversations (`.json` list or `.jsonl`), every turn; see the module doc."""
    return _build("llava", ann_path, image_root, split, heldout_fraction, instruction, max_bad_fraction,
                  vis_processor, text_processor)


@DATASETS.register("qa_jsonl")
def qa_jsonl(ann_path: LocalPath, image_root: LocalPath, split: Split = "train",
             heldout_fraction: HeldoutFraction = 0.05, instruction: str = "{}",
             max_bad_fraction: BadFraction = 0.5,
             vis_processor: Annotated[dict, Part(PROCESSORS)] | None = None,
             text_processor: Annotated[dict, Part(PROCESSORS)] | None = None) -> CustomDataset:
    """Your `{"image", "question", "answer"}` lines (`.jsonl`, or a `.json` list); see the module doc."""
    return _build("qa", ann_path, image_root, split, heldout_fraction, instruction, max_bad_fraction,
                  vis_processor, text_processor)


# --- preflight: images and lengths, then refuse mostly-bad data --------------------------------------

@dataclass
class DataReport:
    name: str
    source: CustomFile
    problems: list[Problem]  # the file's and preflight's, by line
    max_bad_fraction: float
    used: int  # rows of this dataset's split

    @property
    def bad_rows(self) -> int:
        return len({p.line for p in self.problems})

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.source.total if self.source.total else 1.0

    @property
    def refused(self) -> bool:
        return self.bad_fraction > self.max_bad_fraction

    def lines(self, show: int = 5) -> list[str]:
        s = self.source
        out = [f"{self.name}: {s.path} ({s.format}): {s.total} rows, {s.total - self.bad_rows} good, "
               f"{self.bad_rows} bad ({self.bad_fraction:.1%}; refused above {self.max_bad_fraction:.0%}); "
               f"{self.used} in this split"]
        for kind, n in sorted(Counter(p.kind for p in self.problems).items()):
            out.append(f"  {kind}: {n}  ({PROBLEMS[kind]})")
        for problem in self.problems[:show]:
            out.append(f"  {problem.describe(s.path)}")
        if len(self.problems) > show:
            out.append(f"  ... and {len(self.problems) - show} more")
        return out


def custom_datasets(datasets: Mapping) -> dict[str, CustomDataset]:
    return {name: d for name, d in datasets.items() if isinstance(d, CustomDataset)}


def preflight(datasets: Mapping, tokenizer=None, *, model: Mapping | None = None, full: bool = False,
              refuse: bool = True) -> list[DataReport]:
    """Check the custom-format datasets among `datasets` (entry name -> built dataset).

    Images: the header must open (`full`: the whole image must decode, as training reads it).
    Lengths: with a tokenizer (built from `model.tokenizer` when only `model` is given), the
    regressed part of each sample (answers + end_sym, later turns) against `model.max_txt_len`.
    Raises ConfigError (`datasets.<name>`) when `refuse` and a dataset's bad rows are more than its
    `max_bad_fraction`; returns the reports otherwise."""
    chosen = custom_datasets(datasets)
    if not chosen:
        return []
    model = model or {}
    if tokenizer is None and model.get("tokenizer"):
        tokenizer = build_tokenizer(model)
    counter = TokenCounter(tokenizer, model) if tokenizer is not None else None
    reports = [_report(name, dataset, counter, full) for name, dataset in chosen.items()]
    if refuse:
        for report in reports:
            if report.refused:
                raise ConfigError(f"datasets.{report.name}", "refusing the data: " + "\n".join(report.lines()) +
                                  "\n(fix the rows, or raise max_bad_fraction; scripts/check_data.py prints all)")
            if report.problems:
                log.warning("%s\n(these rows are left out or cut; scripts/check_data.py prints all)",
                            "\n".join(report.lines()))
    return reports


def build_tokenizer(model: Mapping):
    from ..registry import TOKENIZERS
    from ..models import tokenizer as _  # noqa: F401  (registers the tokenizers)
    return TOKENIZERS.build(model["tokenizer"], "model.tokenizer")


def _report(name: str, dataset: CustomDataset, counter: "TokenCounter | None", full: bool) -> DataReport:
    source = dataset.source
    problems = list(source.problems)
    seen_images: dict[str, str | None] = {}
    for row in source.rows:  # the whole file: the held-out rows are data too
        path = source.image_path(row)
        if path not in seen_images:
            seen_images[path] = image_problem(path, dataset.max_image_pixels, full)
        if seen_images[path]:
            problems.append(Problem(row.line, "unreadable_image", seen_images[path]))
        elif counter is not None:
            too_long = counter.too_long(row, dataset.instruction)
            if too_long:
                problems.append(Problem(row.line, "too_long", too_long))
    problems.sort(key=lambda p: p.line)
    return DataReport(name, source, problems, dataset.max_bad_fraction, len(dataset))


def image_problem(path: str, max_pixels: int | None, full: bool) -> str | None:
    """Why the image cannot be used, or None. Fast: the header opens; full: it decodes."""
    if full:
        try:
            load_image(path, max_pixels)
        except SkipSample as skip:
            return f"{skip.reason}: {skip.detail}"
        return None
    if os.path.getsize(path) == 0:
        return f"{path}: empty file"
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (header only)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{path}: {type(e).__name__}: {e}"
    return None


class TokenCounter:
    """Counts a row's tokens as TinyGPTV.build_sequence does (its `_regressed_part`): the answers
    with end_sym, and each later turn's BOS + templated question; that part is cut at max_txt_len."""

    def __init__(self, tokenizer, model: Mapping):
        self.tokenizer = tokenizer
        self.template = model.get("prompt_template", "{}")
        self.end_sym = model.get("end_sym", "\n")
        self.max_txt_len = int(model.get("max_txt_len", 32))

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def regressed(self, row: Row, instruction: str) -> int:
        prompt, answer = sample_text(row, instruction)
        prompts = prompt if isinstance(prompt, list) else [prompt]
        answers = answer if isinstance(answer, list) else [answer]
        total = sum(self.count(a + self.end_sym) for a in answers)
        return total + sum(1 + self.count(self.template.format(p)) for p in prompts[1:])

    def too_long(self, row: Row, instruction: str) -> str | None:
        n = self.regressed(row, instruction)
        if n <= self.max_txt_len:
            return None
        return f"{n} tokens of answer{'s and later turns' if len(row.answers) > 1 else ''} > max_txt_len " \
               f"{self.max_txt_len}: the end would be cut off in training"


def format_reports(reports: Iterable[DataReport], show: int = 5) -> str:
    return "\n".join(line for report in reports for line in report.lines(show))
