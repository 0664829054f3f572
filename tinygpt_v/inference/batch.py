"""Batch prediction over a folder of images or a jsonl of (image, question).

    requests = read_requests("questions.jsonl")            # {"image": "a.jpg", "question": "...", "id": ...}
    requests = read_requests("photos/", question="Describe this image.")
    for result in predict(model, requests, template="stage4", batch_size=8):
        print(result)                                       # {"id", "image", "question", "answer"}

Relative image paths in a jsonl are read from the jsonl's folder. Each question is asked on its
own (a one-turn conversation in the template); batches are left padded by `generate`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .images import image_processor, to_pixels
from .settings import GenerationSettings
from .templates import ChatTemplate, get_template

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Request:
    id: str
    image: str
    question: str


def read_requests(source: str | Path, question: str | None = None) -> list[Request]:
    """Requests from a jsonl file, or one per image in a folder (all asked `question`)."""
    source = Path(source).expanduser()
    if source.is_dir():
        if not question:
            raise ValueError(f"{source} is a folder of images: give the question to ask about each")
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [Request(id=p.name, image=str(p), question=question) for p in images]
    return list(_read_jsonl(source, question))


def _read_jsonl(path: Path, default_question: str | None) -> Iterator[Request]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            question = record.get("question", default_question)
            if "image" not in record or not question:
                raise ValueError(f"{path}:{lineno}: each line needs \"image\" and \"question\"")
            image = Path(record["image"]).expanduser()
            yield Request(id=str(record.get("id", lineno)), image=str(image if image.is_absolute() else path.parent / image),
                          question=question)


def predict(model, requests: Iterable[Request], template: str | Mapping | ChatTemplate = "stage4",
            generation: GenerationSettings | None = None, batch_size: int = 8,
            image_size: int | None = None) -> Iterator[dict]:
    """Answer every request, `batch_size` at a time, in order."""
    template = get_template(template)
    kwargs = (generation or GenerationSettings()).generate_kwargs()
    processor = image_processor(model, image_size)
    requests = list(requests)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        pixels = torch.cat([to_pixels(r.image, processor) for r in chunk])
        prompts = [template.render([r.question], [], with_image=True) for r in chunk]
        answers = model.generate(pixels, prompts, apply_template=False, **kwargs)
        for request, answer in zip(chunk, answers):
            yield {**asdict(request), "answer": answer}


def write_jsonl(results: Iterable[dict], path: str | Path) -> int:
    """Write one JSON object a line, as each result arrives; returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            count += 1
    return count
