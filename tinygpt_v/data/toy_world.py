"""A synthetic "toy world" written in every on-disk format the loaders read.

Each scene is one or two coloured shapes (circle, square, triangle; six colours) on a plain
background; with two shapes, one is in the left half and one in the right. From the scene we
know everything: captions, detailed descriptions, questions and answers, boxes, referring
expressions, conversations. The tests read every loader from it and the offline demo trains
on it. Deterministic by seed; about a second to write.

Held-out questions (`heldout/vqa_heldout.json`, images never used for training) all ask the
colour of a named shape: six answers, equally likely, independent of the shape, so a model
that does not look at the image scores 1/6 on average. `README.json` states that chance
accuracy and the best image-blind baseline measured on the files themselves.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20)}
FRUIT = {"red": "apple", "green": "lime", "blue": "blueberry", "yellow": "banana", "purple": "grape",
         "orange": "orange"}  # the "outside knowledge" of the toy OK-VQA
SIDES = {"circle": "no", "square": "four", "triangle": "three"}
NUMBERS = {1: "one", 2: "two"}
WORDS = ("shop", "cafe", "hotel", "bank", "park", "taxi", "stop", "exit")  # toy scene text
GENRES = ("history", "poetry", "travel", "cooking")
AUTHORS = ("ann lee", "bo chen", "cy diaz", "di eko")


@dataclass
class Shape:
    shape: str
    colour: str
    box: list[int]  # x1, y1, x2, y2 in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def a_name(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


@dataclass
class Scene:
    image_id: int
    background: str
    shapes: list[Shape]
    word: str | None = None  # text written on the image (TextCaps / OCR-VQA scenes)


# --- scenes and pictures ---------------------------------------------------------------------------------

def random_scene(image_id: int, rng: random.Random, size: int) -> Scene:
    count = rng.choice((1, 2))
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    halves = [(0, size)] if count == 1 else [(0, size // 2), (size // 2, size)]
    shapes = []
    for kind, colour, (lo, hi) in zip(kinds, colours, halves):
        side = rng.randint(size * 28 // 100, size * 40 // 100)
        x1 = rng.randint(lo + 2, hi - side - 2)
        y1 = rng.randint(2, size - side - 2)
        shapes.append(Shape(kind, colour, [x1, y1, x1 + side, y1 + side]))
    return Scene(image_id, rng.choice(list(BACKGROUNDS)), shapes)


def render(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    if scene.word:
        text_colour = (250, 250, 250) if scene.background == "black" else (10, 10, 10)
        draw.text((4, size - 14), scene.word.upper(), fill=text_colour)
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# --- language about a scene -----------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    things = " and ".join(s.a_name for s in scene.shapes)
    return f"{things} on a {scene.background} background"


def position_words(scene: Scene, s: Shape) -> str:
    if len(scene.shapes) == 1:
        return ""
    return " on the left" if s is scene.shapes[0] else " on the right"


def description(scene: Scene) -> str:
    parts = [f"{s.a_name}{position_words(scene, s)}" for s in scene.shapes]
    total = NUMBERS[len(scene.shapes)]
    return (f"The image shows {' and '.join(parts)}. The background is {scene.background}. "
            f"There {'is' if total == 'one' else 'are'} {total} shape{'s' if total != 'one' else ''} in total.")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, type) about the scene; every answer needs the picture."""
    out = [(f"what colour is the {s.shape}?", s.colour, "colour") for s in scene.shapes]
    s = rng.choice(scene.shapes)
    out.append((f"what shape is the {s.colour} object?", s.shape, "shape"))
    out.append(("how many shapes are there?", NUMBERS[len(scene.shapes)], "count"))
    asked = rng.choice(SHAPES)
    out.append((f"is there a {asked}?", "yes" if any(x.shape == asked for x in scene.shapes) else "no", "exists"))
    if len(scene.shapes) == 2:
        a, b = rng.sample(scene.shapes, 2)
        out.append((f"is the {a.shape} left of the {b.shape}?", "yes" if a is scene.shapes[0] else "no", "position"))
    out.append(("what colour is the background?", scene.background, "background"))
    return out


def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    s = rng.choice(scene.shapes)
    others = [o for o in scene.shapes if o is not s]
    rest = f"only the {others[0].name} would remain" if others else "the picture would show only the background"
    return (f"If the {s.shape} were removed from the picture, what would be left?",
            f"Without the {s.name}, {rest}, on a {scene.background} background.")


# --- the writer --------------------------------------------------------------------------------------------

class ToyWriter:
    def __init__(self, out: str, seed: int, size: int):
        self.out, self.size = out, size
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self._jpegs: dict[int, bytes] = {}

    def path(self, *parts: str) -> str:
        path = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def jpeg(self, scene: Scene) -> bytes:
        if scene.image_id not in self._jpegs:
            self._jpegs[scene.image_id] = jpeg_bytes(render(scene, self.size))
        return self._jpegs[scene.image_id]

    def image(self, scene: Scene, *parts: str) -> None:
        with open(self.path(*parts), "wb") as f:
            f.write(self.jpeg(scene))

    def json(self, data, *parts: str, what: str | None = None, count: int | None = None) -> None:
        with open(self.path(*parts), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        if what:
            self.counts[what] = count if count is not None else len(data)


def make_toy_world(out_dir: str, seed: int = 0, n_train: int = 120, n_heldout: int = 40,
                   image_size: int = 112) -> dict:
    """Write the toy world under `out_dir`; returns (and writes as README.json) its metadata."""
    start = time.perf_counter()
    w = ToyWriter(out_dir, seed, image_size)
    train = [random_scene(100000 + i, w.rng, image_size) for i in range(n_train)]
    heldout = [random_scene(900000 + i, w.rng, image_size) for i in range(n_heldout)]
    _write_pairs(w, train)
    _write_cc_sbu_align(w, train)
    _write_coco_images(w, train)
    _write_llava(w, train)
    _write_unnatural(w)
    _write_refcoco(w, train)
    _write_flickr(w, train)
    _write_visual_genome(w, train)
    _write_vqa(w, train)
    _write_text_scenes(w, n_train // 3)
    chance = _write_heldout(w, train, heldout)
    meta = {"seed": seed, "image_size": image_size, "train_images": n_train, "heldout_images": n_heldout,
            "colours": list(COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
            "records": dict(sorted(w.counts.items())), **chance,
            "seconds": round(time.perf_counter() - start, 3)}
    w.json({"train": [asdict(s) for s in train], "heldout": [asdict(s) for s in heldout]}, "scenes.json")
    w.json(meta, "README.json")
    return meta


def _write_pairs(w: ToyWriter, scenes: list[Scene]) -> None:
    """img2dataset-style shards: <key>.jpg, <key>.txt, <key>.json; two shards per dataset."""
    for dataset in ("laion", "cc_sbu"):
        half = (len(scenes) + 1) // 2
        for shard, part in enumerate((scenes[:half], scenes[half:])):
            with tarfile.open(w.path(dataset, f"{shard:05d}.tar"), "w") as tar:
                for n, scene in enumerate(part):
                    key = f"{shard:05d}{n:04d}"
                    meta = {"caption": caption(scene), "key": key, "status": "success",
                            "url": f"http://toy.invalid/{scene.image_id}.jpg", "width": w.size, "height": w.size}
                    for ext, data in (("jpg", w.jpeg(scene)), ("txt", caption(scene).encode()),
                                      ("json", json.dumps(meta).encode())):
                        _add_member(tar, f"{key}.{ext}", data)
        w.counts[dataset] = len(scenes)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _write_cc_sbu_align(w: ToyWriter, scenes: list[Scene]) -> None:
    annotations = []
    for scene in scenes:
        w.image(scene, "cc_sbu_align", "image", f"{scene.image_id}.jpg")
        annotations.append({"image_id": str(scene.image_id), "caption": description(scene)})
    w.json({"annotations": annotations}, "cc_sbu_align", "filter_cap.json", what="cc_sbu_align", count=len(annotations))


def _write_coco_images(w: ToyWriter, scenes: list[Scene]) -> None:
    # COCO is shared: LLaVA/A-OKVQA use 2017 names, VQAv2/OK-VQA/RefCOCO the 2014 names
    for scene in scenes:
        w.image(scene, "coco", "train2014", f"COCO_train2014_{scene.image_id:012d}.jpg")
        w.image(scene, "coco", "train2017", f"{scene.image_id:012d}.jpg")


def _llava_record(scene: Scene, turns: list[tuple[str, str]]) -> dict:
    conversation = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        conversation.append({"from": "gpt", "value": answer})
    return {"id": f"{scene.image_id:012d}", "image": f"{scene.image_id:012d}.jpg", "conversations": conversation}


def _write_llava(w: ToyWriter, scenes: list[Scene]) -> None:
    files = {"conversation_58k.json": [], "detail_23k.json": [], "complex_reasoning_77k.json": []}
    multitask = []
    for scene in scenes:
        qa = [(q.capitalize(), a.capitalize() + ".") for q, a, _ in questions(scene, w.rng)]
        files["conversation_58k.json"].append(_llava_record(scene, w.rng.sample(qa, 3)))
        files["detail_23k.json"].append(_llava_record(scene, [("Describe the image in detail.", description(scene))]))
        files["complex_reasoning_77k.json"].append(_llava_record(scene, [reasoning(scene, w.rng)]))
        multitask.append(_llava_record(scene, [(q, a) for q, a, _ in w.rng.sample(questions(scene, w.rng), 2)]))
    for name, records in files.items():
        w.json(records, "llava", name, what=f"llava/{name}")
    w.json(multitask, "multitask_conversation", "multitask_conversation.json", what="multitask_conversation")


def _write_unnatural(w: ToyWriter) -> None:
    """Text only, as the released core_data.jsonl (one JSON object a line)."""
    records = []
    for shape in SHAPES:
        records.append(("How many sides does a shape have?", f"Shape: {shape}", None,
                        f"A {shape} has {SIDES[shape]} sides."))
    for colour in COLOURS:
        records.append(("Spell the word backwards.", f"Word: {colour}", "Answer in lower case.", colour[::-1]))
        records.append(("Name a fruit of this colour.", f"Colour: {colour}", None, FRUIT[colour]))
    with open(w.path("unnatural_instructions", "core_data.jsonl"), "w", encoding="utf-8") as f:
        for instruction, given, constraints, output in records:
            instance = {"instruction_with_input": f"{instruction}\n{given}", "input": given,
                        "constraints": constraints, "output": output}
            f.write(json.dumps({"instruction": instruction, "instances": [instance]}) + "\n")
    w.counts["unnatural_instructions"] = len(records)


def _write_refcoco(w: ToyWriter, scenes: list[Scene]) -> None:
    """refs(<split_by>).p (a plain-data pickle, as released) + instances.json per dataset."""
    variants = {"refcoco": ("unc", lambda sc, s: [f"the {s.name}", f"{s.shape}{position_words(sc, s)}"]),
                "refcoco+": ("unc", lambda sc, s: [f"{s.name}", f"the {s.colour} one"]),
                "refcocog": ("umd", lambda sc, s: [f"{s.a_name} on a {sc.background} background"])}
    for dataset, (split_by, expressions) in variants.items():
        refs, annotations, images = [], [], []
        for scene in scenes:
            images.append({"id": scene.image_id, "file_name": f"COCO_train2014_{scene.image_id:012d}.jpg",
                           "width": w.size, "height": w.size})
            for s in scene.shapes:
                ann_id = len(annotations) + 1
                x1, y1, x2, y2 = s.box
                annotations.append({"id": ann_id, "image_id": scene.image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "category_id": SHAPES.index(s.shape) + 1, "area": (x2 - x1) * (y2 - y1)})
                sentences = [{"raw": e, "sent": e, "tokens": e.split(), "sent_id": ann_id * 10 + i}
                             for i, e in enumerate(expressions(scene, s))]
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": scene.image_id, "split": "train",
                             "sentences": sentences, "category_id": SHAPES.index(s.shape) + 1,
                             "sent_ids": [x["sent_id"] for x in sentences]})
        with open(w.path("refcoco", dataset, f"refs({split_by}).p"), "wb") as f:
            pickle.dump(refs, f, protocol=2)
        w.json({"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]},
               "refcoco", dataset, "instances.json")
        w.counts[f"refcoco/{dataset}"] = len(refs)


def _write_flickr(w: ToyWriter, scenes: list[Scene]) -> None:
    """Flickr30k Entities: Sentences/<id>.txt with [/EN#<n>/<type> phrase] markup, Annotations/<id>.xml."""
    for scene in scenes:
        w.image(scene, "flickr30k", "flickr30k-images", f"{scene.image_id}.jpg")
        marked = [f"[/EN#{n + 1}/other {s.a_name}]" for n, s in enumerate(scene.shapes)]
        lines = [f"{' and '.join(marked)} on a {scene.background} background .",
                 f"A picture of {' beside '.join(marked)} ."]
        with open(w.path("flickr30k", "Sentences", f"{scene.image_id}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        objects = "".join(
            f"<object><name>{n + 1}</name><bndbox><xmin>{s.box[0]}</xmin><ymin>{s.box[1]}</ymin>"
            f"<xmax>{s.box[2]}</xmax><ymax>{s.box[3]}</ymax></bndbox></object>" for n, s in enumerate(scene.shapes))
        with open(w.path("flickr30k", "Annotations", f"{scene.image_id}.xml"), "w", encoding="utf-8") as f:
            f.write(f"<annotation><filename>{scene.image_id}.jpg</filename><size><width>{w.size}</width>"
                    f"<height>{w.size}</height><depth>3</depth></size>{objects}"
                    f"<object><name>0</name><nobndbox>1</nobndbox></object></annotation>\n")
    with open(w.path("flickr30k", "train.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{s.image_id}\n" for s in scenes))
    w.counts["flickr30k"] = len(scenes)


def _write_visual_genome(w: ToyWriter, scenes: list[Scene]) -> None:
    image_data, regions = [], []
    for scene in scenes:
        w.image(scene, "visual_genome", "VG_100K", f"{scene.image_id}.jpg")
        image_data.append({"image_id": scene.image_id, "width": w.size, "height": w.size,
                           "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{scene.image_id}.jpg"})
        regions.append({"id": scene.image_id, "regions": [
            {"region_id": scene.image_id * 10 + n, "image_id": scene.image_id, "phrase": s.name,
             "x": s.box[0], "y": s.box[1], "width": s.box[2] - s.box[0], "height": s.box[3] - s.box[1]}
            for n, s in enumerate(scene.shapes)]})
    w.json(image_data, "visual_genome", "image_data.json")
    w.json(regions, "visual_genome", "region_descriptions.json", what="visual_genome",
           count=sum(len(r["regions"]) for r in regions))


def _write_vqa(w: ToyWriter, scenes: list[Scene]) -> None:
    coco, okvqa, aokvqa, gqa = [], [], [], []
    for scene in scenes:
        coco_image = f"train2014/COCO_train2014_{scene.image_id:012d}.jpg"
        for n, (question, answer, _) in enumerate(questions(scene, w.rng)):
            coco.append({"question_id": scene.image_id * 100 + n, "question": question, "answer": [answer] * 10,
                         "image": coco_image, "dataset": "vqa"})
        s = w.rng.choice(scene.shapes)
        okvqa.append({"question_id": scene.image_id * 100, "question": f"which fruit has the colour of the {s.shape}?",
                      "answer": [FRUIT[s.colour]] * 10, "image": coco_image, "dataset": "okvqa"})
        choices = w.rng.sample([c for c in SHAPES if c != s.shape], 2) + [s.shape]
        aokvqa.append({"split": "train", "image_id": scene.image_id, "question_id": f"toy{scene.image_id}",
                       "question": f"which shape is {s.colour}?", "choices": choices, "correct_choice_idx": 2,
                       "direct_answers": [s.shape] * 10, "difficult_direct_answer": False,
                       "rationales": [f"The {s.colour} object is a {s.shape}."]})
        w.image(scene, "gqa", "images", f"{scene.image_id}.jpg")
        question, answer, _ = w.rng.choice(questions(scene, w.rng))
        gqa.append({"question_id": str(scene.image_id), "question": question, "answer": answer,
                    "image": f"{scene.image_id}.jpg"})
    held = len(coco) // 10  # the last questions play VQAv2's val split (the real configs train on both)
    w.json(coco[:-held], "vqav2", "vqa_train.json", what="vqav2")
    w.json(coco[-held:], "vqav2", "vqa_val.json", what="vqav2_val")
    w.json(okvqa, "okvqa", "okvqa_train.json", what="okvqa")
    w.json(aokvqa, "aokvqa", "aokvqa_v1p0_train.json", what="aokvqa")
    w.json(gqa, "gqa", "train_balanced_questions.json", what="gqa")


def _write_text_scenes(w: ToyWriter, count: int) -> None:
    """Scenes with a written word: TextCaps captions and OCR-VQA book covers."""
    textcaps, books = [], {}
    for i in range(count):
        scene = random_scene(200000 + i, w.rng, w.size)
        scene.word = w.rng.choice(WORDS)
        w.image(scene, "textcaps", "train_images", f"{scene.image_id}.jpg")
        textcaps.append({"image_id": str(scene.image_id), "caption_str": f"a sign that says {scene.word} "
                         f"above {scene.shapes[0].a_name}", "image_path": f"train/{scene.image_id}.jpg"})
        book = random_scene(300000 + i, w.rng, w.size)
        book.word = w.rng.choice(WORDS)
        w.image(book, "ocrvqa", "images", f"{book.image_id}.jpg")
        author, genre = w.rng.choice(AUTHORS), GENRES[i % len(GENRES)]
        books[str(book.image_id)] = {
            "imageURL": f"http://toy.invalid/{book.image_id}.jpg", "title": book.word, "authorName": author,
            "genre": genre, "split": 1 if i % 5 else 2,
            "questions": ["What is the title of this book?", "What colour is the shape on this book?"],
            "answers": [book.word, book.shapes[0].colour]}
    w.json({"data": textcaps}, "textcaps", "TextCaps_0.1_train.json", what="textcaps", count=len(textcaps))
    w.json(books, "ocrvqa", "dataset.json", what="ocrvqa_books")


def _write_heldout(w: ToyWriter, train: list[Scene], heldout: list[Scene]) -> dict:
    """Colour-of-a-shape questions on unseen images (LAVIS VQA layout) + their chance level."""
    records = []
    for scene in heldout:
        w.image(scene, "heldout", "images", f"{scene.image_id}.jpg")
        for n, s in enumerate(scene.shapes):
            records.append({"question_id": scene.image_id * 10 + n, "question": f"what colour is the {s.shape}?",
                            "answer": [s.colour] * 10, "image": f"images/{scene.image_id}.jpg"})
    w.json(records, "heldout", "vqa_heldout.json", what="heldout_questions")
    # the best a model can do without the image: per question text, the most common train answer
    train_answers: dict[str, Counter] = {}
    for scene in train:
        for s in scene.shapes:
            train_answers.setdefault(f"what colour is the {s.shape}?", Counter())[s.colour] += 1
    blind_hits = sum(r["answer"][0] == train_answers.get(r["question"], Counter({"": 1})).most_common(1)[0][0]
                     for r in records)
    blind = blind_hits / len(records)
    return {"heldout_task": "what colour is the <shape>? (one word, one of the colours)",
            "chance_accuracy": round(1 / len(COLOURS), 4),
            "blind_baseline_accuracy": round(blind, 4),
            "chance_note": "chance_accuracy: answers are uniform over the colours and independent of the shape; "
                           "blind_baseline_accuracy: always answering the most common train colour of the "
                           "named shape, measured on these held-out questions"}


# --- fine-tuning data in the custom formats (tinygpt_v/data/custom.py) ---------------------------------
# A question no demo stage trains on: the corners of the shape of a named colour. It needs the
# picture (which shape has that colour) and answers with words the demo never gave ("none").

CORNERS = {"circle": "none", "square": "four", "triangle": "three"}


def corners_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    s = rng.choice(scene.shapes)
    return f"how many corners does the {s.colour} shape have?", CORNERS[s.shape]


def export_custom_formats(out_dir: str, seed: int = 1, n_images: int = 400, image_size: int = 112) -> dict:
    """The toy world as a user's fine-tuning data: `images/`, `qa.jsonl` (one corners question per
    image) and `llava.json` (the same question, then the background colour, as a conversation),
    with the same ids, so both split alike. Returns (and writes as README.json) its metadata."""
    w = ToyWriter(out_dir, seed, image_size)
    scenes = [random_scene(500000 + i, w.rng, image_size) for i in range(n_images)]
    qa, llava = [], []
    for scene in scenes:
        name = f"images/{scene.image_id}.jpg"  # relative to the files: also chat --batch's convention
        w.image(scene, name)
        question, answer = corners_question(scene, w.rng)
        qa.append({"id": str(scene.image_id), "image": name, "question": question, "answer": answer})
        record = _llava_record(scene, [(question, answer), ("what colour is the background?", scene.background)])
        llava.append(dict(record, id=str(scene.image_id), image=name))
    with open(w.path("qa.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in qa)
    w.json(llava, "llava.json")
    most_common = Counter(r["answer"] for r in qa).most_common(1)[0][1]
    meta = {"seed": seed, "image_size": image_size, "images": n_images, "question": "how many corners does the "
            "<colour> shape have? (none / three / four)", "chance_accuracy": round(1 / len(CORNERS), 4),
            "majority_answer_accuracy": round(most_common / len(qa), 4)}
    w.json(meta, "README.json")
    return meta
