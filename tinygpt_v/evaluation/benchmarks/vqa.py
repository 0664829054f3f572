"""VQAv2 and OK-VQA: VQA accuracy, with a breakdown by answer type.

Files: the official questions json {"questions": [{image_id, question, question_id}]} and
annotations json {"annotations": [{question_id, answers: [{answer, ...}] x10, answer_type, ...}]};
images `<image_root>/<image_pattern>` with the COCO file naming by default. `protocol: original`
builds the original eval_vqa.py's OK-VQA prompt (`OKVQAEvalData`'s instruction in its
conversation template; see evaluation/original.py).

Scorings (see `metrics.VQA_ACCURACY` for the sources, commits and differences):
`official` (GT-Vision-Lab/VQA vqaEval.py, the default), `evalai` (Cloud-CV/VQA-Evaluation, the
EvalAI server), `original` (the copy the original TinyGPT-V's eval_vqa.py imports), `lenient`
(ours, always normalising; not comparable with papers). `official`, `evalai` and `lenient` score
the prediction as stored (the reply, as a user would submit it); `original` first applies the
original eval_vqa.py's reply clean-up (`original_reply_cleanup`), as that script does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from ...registry import BENCHMARKS, LocalPath
from ..benchmark import SHORT_ANSWER, Benchmark, BenchmarkDataError, Sample, accuracy_by, read_json, require
from ..metrics import VQA_ACCURACY, normalize_vqa_answer
from ..original import Protocol

VQA_SCORINGS = tuple(VQA_ACCURACY)  # official, evalai, original, lenient


def original_reply_cleanup(reply: str) -> str:
    """The reply clean-up of the original's eval_vqa.py (OK-VQA), in its order: lower-case, drop
    "<unk>", strip, cut at "###", keep what follows the last "Assistant:", strip.

    Its quirk kept: the "Assistant:" split comes after lower-casing, so it never matches
    ("Assistant: x" stays "assistant: x"). Our models' replies hold only the new tokens, so this
    matters only for predictions from other frameworks. Checked against the original's own
    statements in tests/test_eval_scorers_vqa.py."""
    answer = reply.lower().replace("<unk>", "").strip()
    answer = answer.split("###")[0]
    return answer.split("Assistant:")[-1].strip()


def vqa_scores(rows: list[dict], scoring: str, group_by_type: bool) -> dict[str, float]:
    scorer = VQA_ACCURACY[scoring]
    answer_of = original_reply_cleanup if scoring == "original" else (lambda reply: reply)
    return accuracy_by(rows, lambda row: scorer(answer_of(row["prediction"]), row["target"]["answers"]),
                       group=(lambda row: row["target"]["answer_type"]) if group_by_type else None)


class VQAScorings:
    """score_<name> for every VQA-accuracy scoring, for benchmarks whose targets hold "answers"."""
    SCORINGS: ClassVar[tuple[str, ...]] = VQA_SCORINGS
    group_by_answer_type: ClassVar[bool] = False

    def score_official(self, rows: list[dict]) -> dict[str, float]:
        return vqa_scores(rows, "official", self.group_by_answer_type)

    def score_evalai(self, rows: list[dict]) -> dict[str, float]:
        return vqa_scores(rows, "evalai", self.group_by_answer_type)

    def score_original(self, rows: list[dict]) -> dict[str, float]:
        return vqa_scores(rows, "original", self.group_by_answer_type)

    def score_lenient(self, rows: list[dict]) -> dict[str, float]:
        return vqa_scores(rows, "lenient", self.group_by_answer_type)


@BENCHMARKS.register("vqav2")
@BENCHMARKS.register("okvqa")
@dataclass(kw_only=True)
class VQA(VQAScorings, Protocol, Benchmark):
    questions: LocalPath
    annotations: LocalPath | None = None  # null: test splits (no answers); predict, then write_submission
    image_root: LocalPath
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"
    group_by_answer_type: ClassVar[bool] = True

    def load(self) -> list[Sample]:
        questions = require(read_json(self.questions), "questions", self.questions, list)
        answers_of = self._answers_by_question() if self.annotations else None
        samples = []
        for i, q in enumerate(questions):
            where = f"{self.questions}: questions[{i}]"
            qid = require(q, "question_id", where, int)
            if answers_of is not None and qid not in answers_of:
                raise BenchmarkDataError(f"{where}: question_id {qid} has no entry in {self.annotations}")
            image = self.image_pattern.format(image_id=require(q, "image_id", where, int))
            samples.append(Sample(
                id=str(qid),
                image=os.path.join(self.image_root, image),
                prompt=self.build_prompt(SHORT_ANSWER.format(require(q, "question", where, str))),
                target=answers_of[qid] if answers_of is not None else {"answers": None, "answer_type": "unknown"}))
        return samples

    def _answers_by_question(self) -> dict[int, dict]:
        annotations = require(read_json(self.annotations), "annotations", self.annotations, list)
        answers_of = {}
        for i, a in enumerate(annotations):
            where = f"{self.annotations}: annotations[{i}]"
            answers = [require(x, "answer", f"{where}, answers", str) for x in require(a, "answers", where, list)]
            if not answers:
                raise BenchmarkDataError(f"{where}: no human answers to score against")
            answers_of[require(a, "question_id", where, int)] = {
                "answers": answers, "answer_type": a.get("answer_type", "unknown")}
        return answers_of

    def has_ground_truth(self) -> bool:
        return self.annotations is not None

    def score(self, rows: list[dict], scoring: str) -> dict[str, float]:
        if self.annotations is None:
            raise BenchmarkDataError(f"{self.questions}: no annotations to score against (a test split); "
                                     "eval.py writes <name>_submission.json for the EvalAI server instead")
        return super().score(rows, scoring)

    def write_outputs(self, rows: list[dict], output_dir: str, name: str) -> list[str]:
        """A test split (no annotations): the EvalAI submission file `<name>_submission.json`."""
        if self.annotations is not None:
            return []
        path = os.path.join(output_dir, f"{name}_submission.json")
        write_submission(rows, self.questions, path)
        return [path]


def submission_answer(reply: str) -> str:
    """The answer written for the EvalAI server: the normalisation the server applies to every
    prediction (Cloud-CV/VQA-Evaluation: whitespace, processPunctuation, processDigitArticle), as
    LAVIS and lmms-eval apply it before writing their result files, so the file scores the same
    under a scorer that skips it (GT-Vision-Lab's, when the humans agree)."""
    return normalize_vqa_answer(reply)


def write_submission(rows: list[dict], questions_file: str, path: str) -> list[dict]:
    """Write `[{"question_id": int, "answer": str}]` for the VQA challenge server (EvalAI).

    The server refuses a file whose question ids are not exactly those of the split (the VQA
    API's loadRes asserts it), so every question of `questions_file` (e.g.
    v2_OpenEnded_mscoco_test-dev2015_questions.json) must have a row, and no row may name
    another question; both are errors naming the file. Rows are written in question order."""
    questions = require(read_json(questions_file), "questions", questions_file, list)
    wanted = [require(q, "question_id", f"{questions_file}: questions[{i}]", int) for i, q in enumerate(questions)]
    answer_of: dict[int, str] = {}
    for i, row in enumerate(rows):
        qid = _question_id(row, i)
        if qid in answer_of:
            raise BenchmarkDataError(f"prediction row {i}: question_id {qid} occurs twice")
        answer_of[qid] = submission_answer(require(row, "prediction", f"prediction row {i}", str))
    wanted_set = set(wanted)
    unknown = [qid for qid in answer_of if qid not in wanted_set]
    if unknown:
        raise BenchmarkDataError(f"{len(unknown)} predictions name questions not in {questions_file} "
                                 f"(first: {unknown[0]})")
    missing = [qid for qid in wanted if qid not in answer_of]
    if missing:
        raise BenchmarkDataError(f"{questions_file}: {len(missing)} questions have no prediction "
                                 f"(first: {missing[0]}); the server accepts only a complete file")
    results = [{"question_id": qid, "answer": answer_of[qid]} for qid in wanted]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return results


def _question_id(row: dict, index: int) -> int:
    value = require(row, "id", f"prediction row {index}", (int, str))
    try:
        return int(value)
    except ValueError:
        raise BenchmarkDataError(f"prediction row {index}: id {value!r} is not a VQA question id") from None
