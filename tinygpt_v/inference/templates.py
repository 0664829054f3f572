"""Conversation templates: how a multi-turn chat is written out as one prompt text.

A chat about one image is rendered as

    turn(q1) + a1 + after_answer + turn(q2) + a2 + after_answer + ... + turn(q_n)

with the image placed once, at the start of the first question (`<Img><ImageHere></Img> q1`),
and handed to `TinyGPTV.generate(..., apply_template=False)`, which adds the one BOS in front
and splices the image embeddings at `<ImageHere>`. Training puts a BOS before every turn; the
original's chat (and so ours) writes later turns as plain text, which the released checkpoints
answer well.

- `stage1-3`: the instruction template of stages 1-3 (`###Human: {} ###Assistant: `, end_sym
  `###`). The `###` that ends an answer is also the one that opens the next `###Human:`, as in
  the original's chat, so nothing is added after an answer.
- `stage4`: the MiniGPT-v2-style template of stage 4 (`[INST] {} [/INST] `). Answers end with
  the stage-4 end_sym `###`, written out after each past answer as the model produced it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..models import IMAGE_MARKER
from ..registry import ConfigError

IMAGE_PROMPT = f"<Img>{IMAGE_MARKER}</Img>"


@dataclass(frozen=True)
class ChatTemplate:
    turn: str               # one question turn; `{}` is replaced by the question
    after_answer: str = ""  # written after every answer that is part of the history

    def __post_init__(self):
        if self.turn.count("{}") != 1:
            raise ConfigError("inference.template.turn", f"must contain '{{}}' exactly once: {self.turn!r}")

    def render(self, questions: list[str], answers: list[str], with_image: bool) -> str:
        """The prompt text for answering `questions[-1]`; `answers` are the earlier replies."""
        if len(answers) != len(questions) - 1:
            raise ValueError(f"{len(questions)} questions need {len(questions) - 1} earlier answers, "
                             f"got {len(answers)}")
        if with_image:
            questions = [f"{IMAGE_PROMPT} {questions[0]}", *questions[1:]]
        history = "".join(self.turn.format(q) + a + self.after_answer for q, a in zip(questions, answers))
        return history + self.turn.format(questions[-1])


TEMPLATES: dict[str, ChatTemplate] = {
    "stage1-3": ChatTemplate(turn="###Human: {} ###Assistant: ", after_answer=""),
    "stage4": ChatTemplate(turn="[INST] {} [/INST] ", after_answer="###"),
}


def get_template(spec: str | Mapping | ChatTemplate) -> ChatTemplate:
    """A template from its preset name, or from a `{turn: ..., after_answer: ...}` section."""
    if isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"turn", "after_answer"}
        if unknown or "turn" not in spec:
            raise ConfigError("inference.template", "a custom template has `turn` (with '{}') and optionally "
                                                    f"`after_answer`; got keys {sorted(spec)}")
        return ChatTemplate(**spec)
    if spec not in TEMPLATES:
        raise ConfigError("inference.template", f"unknown template {spec!r}; presets: {', '.join(TEMPLATES)}, "
                                                "or a section {turn: '... {} ...', after_answer: '...'}")
    return TEMPLATES[spec]
