"""Multi-turn chat about one image.

    chat = Chat(model, template="stage4")
    chat.upload_image("photo.jpg")            # starts a new conversation about this image
    chat.ask("What is in the picture?")       # -> the answer; it joins the history
    for answer_so_far in chat.ask_stream("What colour is it?"):
        print(answer_so_far)
    chat.clear_history()                      # forget the turns, keep the image
    chat.reset()                              # forget the history and the image

Every question is answered from the conversation, written out by the template (see
templates.py) and passed to `TinyGPTV.generate(..., apply_template=False)`.

A conversation longer than the model's context (`model.max_context_len` prompt tokens, counting
the BOS and the image's tokens) is cut from the front by whole turns: the newest question and
its `###Assistant:` / `[/INST]` cue always reach the model, the oldest question-answer pairs are
left out (`chat.dropped_turns` says how many; `chat.history` still holds them all). The image
stays: the template writes it at the first question that is kept, since the conversation is
about it. A question that does not fit even alone is refused (PromptTooLong) and the
conversation is unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from ..data.base import DEFAULT_MAX_IMAGE_PIXELS
from ..models import IMAGE_MARKER
from .images import image_processor, to_pixels
from .settings import GenerationSettings
from .streaming import stream_generate
from .templates import ChatTemplate, get_template


class PromptTooLong(ValueError):
    """The newest question alone does not fit in the model's context."""


class Chat:
    def __init__(self, model, template: str | Mapping | ChatTemplate = "stage4",
                 generation: GenerationSettings | Mapping | None = None, image_size: int | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.model = model
        self.template = get_template(template)
        self.generation = generation if isinstance(generation, GenerationSettings) \
            else GenerationSettings(**(generation or {}))
        self.processor = image_processor(model, image_size)
        self.max_image_pixels = max_image_pixels
        self.pixels = None
        self.image_tokens = 0
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.dropped_turns = 0  # oldest turns the last prompt left out to fit the context

    def upload_image(self, image) -> None:
        """Start a new conversation about `image` (path, PIL image, array or pixel tensor); a bad
        image (ImageError) leaves the current conversation as it was."""
        pixels = to_pixels(image, self.processor, self.max_image_pixels)
        self.reset()
        self.pixels = pixels
        self.image_tokens = self.model.num_image_tokens(pixels)

    def reset(self) -> None:
        """Forget the conversation and the image."""
        self.clear_history()
        self.pixels, self.image_tokens = None, 0

    def clear_history(self) -> None:
        """Forget the questions and answers; the image stays (a new conversation about it)."""
        self.questions, self.answers, self.dropped_turns = [], [], 0

    @property
    def has_image(self) -> bool:
        return self.pixels is not None

    @property
    def history(self) -> list[tuple[str, str]]:
        return list(zip(self.questions, self.answers))

    def prompt_for(self, question: str) -> str:
        """The text the LLM gets to answer `question` after the conversation so far: the newest
        turns that fit in the model's context (see the module docstring)."""
        if IMAGE_MARKER in question:
            raise ValueError(f"a question cannot contain {IMAGE_MARKER} (it marks where the image goes)")
        questions, answers = self.questions + [question], self.answers
        limit = getattr(self.model, "max_context_len", None)
        for first in range(len(questions)):
            prompt = self.template.render(questions[first:], answers[first:], with_image=self.pixels is not None)
            length = prompt_length(self.model, prompt, self.image_tokens)
            if limit is None or length <= limit:
                self.dropped_turns = first
                return prompt
        with_image = " and the image" if self.pixels is not None else ""
        raise PromptTooLong(f"the question is too long: with the template{with_image} it takes {length} tokens, "
                            f"more than the model's context (model.max_context_len {limit}); ask a shorter one")

    def ask(self, question: str, **generation) -> str:
        """Answer `question`; `generation` overrides the settings for this turn (e.g. temperature)."""
        kwargs = self.generation.replace(**generation).generate_kwargs()
        answer = self.model.generate(self.pixels, [self.prompt_for(question)], apply_template=False, **kwargs)[0]
        self._remember(question, answer)
        return answer

    def ask_stream(self, question: str, **generation) -> Iterator[str]:
        """As `ask`, yielding the answer so far while it is generated; the last item is the answer."""
        kwargs = self.generation.replace(**generation).generate_kwargs()
        answer = ""
        for answer in stream_generate(self.model, self.pixels, self.prompt_for(question), apply_template=False,
                                      **kwargs):
            yield answer
        self._remember(question, answer)

    def _remember(self, question: str, answer: str) -> None:
        self.questions.append(question)
        self.answers.append(answer)


def prompt_length(model, prompt: str, image_tokens: int) -> int:
    """Tokens `TinyGPTV.generate(apply_template=False)` makes of `prompt`: one BOS, the text on each
    side of the image marker tokenised separately, and the image's tokens in its place."""
    def count(text: str) -> int:
        return len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    before, marker, after = prompt.partition(IMAGE_MARKER)
    return 1 + count(before) + (image_tokens + count(after) if marker else 0)


def chat(model, image, question: str, template: str | Mapping | ChatTemplate = "stage4", **generation) -> str:
    """One question about one image (None: a text-only question); returns the answer."""
    session = Chat(model, template, GenerationSettings(**generation))
    if image is not None:
        session.upload_image(image)
    return session.ask(question)
