"""Official VQAv2 / OK-VQA files -> the LAVIS json layout the `coco_vqa` and `ok_vqa` loaders read.

    python dataset/convert_vqa.py \
        --questions v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json \
        --image-prefix train2014/COCO_train2014_ --out data/vqav2/vqa_train.json

Each output record: {"question_id", "question", "answer": [the 10 human answers],
"image": "<image-prefix><image_id:012d>.jpg", "dataset": "vqa"}; `image` is relative to the
dataset's `image_root` (the COCO folder).
"""
from __future__ import annotations

import argparse
import json
import os


def convert(questions: dict, annotations: dict, image_prefix: str, dataset: str) -> list[dict]:
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
    records = []
    for q in questions["questions"]:
        if q["question_id"] not in answers:
            raise ValueError(f"question {q['question_id']} has no annotation")
        records.append({"question_id": q["question_id"], "question": q["question"],
                        "answer": answers[q["question_id"]],
                        "image": f"{image_prefix}{q['image_id']:012d}.jpg", "dataset": dataset})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="official *_questions.json")
    parser.add_argument("--annotations", required=True, help="official *_annotations.json")
    parser.add_argument("--image-prefix", default="train2014/COCO_train2014_")
    parser.add_argument("--dataset", default="vqa", help="value of the `dataset` field (vqa, okvqa)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with open(args.questions, encoding="utf-8") as f:
        questions = json.load(f)
    with open(args.annotations, encoding="utf-8") as f:
        annotations = json.load(f)
    records = convert(questions, annotations, args.image_prefix, args.dataset)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(records, f)
    print(f"wrote {len(records)} questions to {args.out}")


if __name__ == "__main__":
    main()
