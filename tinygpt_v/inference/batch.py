"""Batch prediction over a folder of images or a jsonl of (image, question).

    requests = read_requests("questions.jsonl")            # {"image": "a.jpg", "question": "...", "id": ...}
    requests = read_requests("photos/", question="Describe this image.")
    for result in predict(model, requests, template="stage4", batch_size=8):
        print(result)                                       # {"id", "image", "question", "answer"}

Relative image paths in a jsonl are read from the jsonl's folder. Each question is asked on its
own (a one-turn conversation in the template); batches are left padded by `generate`.

Bad requests do not stop a batch when an `errors` list is given: a malformed jsonl line (named
by file and line), a repeated id, an unreadable image or a decompression bomb, a question too
long for the model's context each become one `RequestError` in the list, and the rest is
answered. Without the list, the first one raises ValueError with the same message.

`answered_ids` + `write_jsonl(..., append=True)` make a run resumable: answers already in the
output file are kept and not asked again (a torn last line, from a run killed mid-write, is
cut off with a warning).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.base import DEFAULT_MAX_IMAGE_PIXELS
from ..models import IMAGE_MARKER
from .conversation import prompt_length
from .images import ImageError, image_processor, to_pixels
from .settings import GenerationSettings
from .templates import ChatTemplate, get_template

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Request:
    id: str
    image: str
    question: str


@dataclass
class RequestError:
    """A request (or request line) that was skipped, and why."""
    where: str   # "questions.jsonl:7" or the request's id
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _report(errors: list | None, error: RequestError) -> None:
    if errors is None:
        raise ValueError(str(error))
    errors.append(error)


def read_requests(source: str | Path, question: str | None = None,
                  errors: list[RequestError] | None = None) -> list[Request]:
    """Requests from a jsonl file, or one per image in a folder (all asked `question`)."""
    source = Path(source).expanduser()
    if source.is_dir():
        if not question:
            raise ValueError(f"{source} is a folder of images: give the question to ask about each")
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [Request(id=p.name, image=str(p), question=question) for p in images]
    return list(_read_jsonl(source, question, errors))


def _read_jsonl(path: Path, default_question: str | None, errors: list | None) -> Iterator[Request]:
    first_line_of: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                record = json.loads(line) if line.strip() else None
            except (UnicodeDecodeError, ValueError) as e:
                _report(errors, RequestError(where, f"not a JSON line ({type(e).__name__}: {e})"))
                continue
            if record is None:
                continue
            request = _request(record, path, lineno, default_question)
            if isinstance(request, str):
                _report(errors, RequestError(where, request))
            elif request.id in first_line_of:
                _report(errors, RequestError(where, f"id {request.id!r} repeats line {first_line_of[request.id]}; "
                                                    f"ids must be unique (answers are matched to requests by id)"))
            else:
                first_line_of[request.id] = lineno
                yield request


def _request(record, path: Path, lineno: int, default_question: str | None) -> Request | str:
    """The request of one parsed line, or why it is not one."""
    if not isinstance(record, Mapping):
        return f"expected an object {{\"image\": ..., \"question\": ...}}, got {type(record).__name__}"
    question = record.get("question", default_question)
    if not isinstance(record.get("image"), str) or not isinstance(question, str) or not question.strip():
        return "each line needs \"image\" and \"question\" (strings), or --question for all of them"
    if IMAGE_MARKER in question:
        return f"the question contains {IMAGE_MARKER}, which marks where the image goes"
    image = Path(record["image"]).expanduser()
    return Request(id=str(record.get("id", lineno)), question=question,
                   image=str(image if image.is_absolute() else path.parent / image))


def predict(model, requests: Iterable[Request], template: str | Mapping | ChatTemplate = "stage4",
            generation: GenerationSettings | None = None, batch_size: int = 8,
            image_size: int | None = None, errors: list[RequestError] | None = None,
            max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """Answer every request, `batch_size` at a time, in order; bad ones go to `errors`."""
    template = get_template(template)
    kwargs = (generation or GenerationSettings()).generate_kwargs()
    processor = image_processor(model, image_size)
    requests = list(requests)
    for start in range(0, len(requests), batch_size):
        ready = [ok for ok in (_prepare(model, r, template, processor, max_image_pixels, errors)
                               for r in requests[start:start + batch_size]) if ok is not None]
        if not ready:
            continue
        pixels = torch.cat([pixels for _, pixels, _ in ready])
        answers = model.generate(pixels, [prompt for _, _, prompt in ready], apply_template=False, **kwargs)
        for (request, _, _), answer in zip(ready, answers):
            yield {**asdict(request), "answer": answer}


def _prepare(model, request: Request, template: ChatTemplate, processor, max_image_pixels, errors):
    """(request, pixels, prompt), or None after reporting why the request cannot be asked."""
    try:
        pixels = to_pixels(request.image, processor, max_image_pixels)
    except ImageError as e:
        _report(errors, RequestError(f"request {request.id}", str(e)))
        return None
    prompt = template.render([request.question], [], with_image=True)
    limit = getattr(model, "max_context_len", None)
    length = prompt_length(model, prompt, model.num_image_tokens(pixels))
    if limit is not None and length > limit:
        _report(errors, RequestError(f"request {request.id}", f"the question takes {length} tokens with the "
                                                              f"template and image, more than model.max_context_len "
                                                              f"{limit}"))
        return None
    return request, pixels, prompt


def answered_ids(path: str | Path) -> set[str]:
    """Ids already answered in an output file (none if it does not exist). A torn last line is
    cut off (with a warning); a damaged line inside is skipped (its request is asked again)."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        log.warning("%s: its last line was cut short (an interrupted run); removed, that request is asked again",
                    path)
        data = data[:keep]
    ids = set()
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, TypeError, KeyError):
            if line.strip():
                log.warning("%s:%d: not an answer line; skipped", path, lineno)
    return ids


def write_jsonl(results: Iterable[dict], path: str | Path, append: bool = False) -> int:
    """Write one JSON object a line, as each result arrives; returns how many. `append` adds to an
    existing file (a resumed run) instead of replacing it."""
    count = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            count += 1
    return count
