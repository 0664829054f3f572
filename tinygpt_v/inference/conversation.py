"""Multi-turn chat about one image.

    chat = Chat(model, template="stage4")
    chat.upload_image("photo.jpg")            # starts a new conversation about this image
    chat.ask("What is in the picture?")       # -> the answer; it joins the history
    for answer_so_far in chat.ask_stream("What colour is it?"):
        print(answer_so_far)
    chat.reset()                              # forget the history (and the image)

Every question is answered from the whole conversation, written out by the template (see
templates.py) and passed to `TinyGPTV.generate(..., apply_template=False)`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from .images import image_processor, to_pixels
from .settings import GenerationSettings
from .streaming import stream_generate
from .templates import ChatTemplate, get_template


class Chat:
    def __init__(self, model, template: str | Mapping | ChatTemplate = "stage4",
                 generation: GenerationSettings | Mapping | None = None, image_size: int | None = None):
        self.model = model
        self.template = get_template(template)
        self.generation = generation if isinstance(generation, GenerationSettings) \
            else GenerationSettings(**(generation or {}))
        self.processor = image_processor(model, image_size)
        self.pixels = None
        self.questions: list[str] = []
        self.answers: list[str] = []

    def upload_image(self, image) -> None:
        """Start a new conversation about `image` (path, PIL image, array or pixel tensor)."""
        self.reset()
        self.pixels = to_pixels(image, self.processor)

    def reset(self) -> None:
        self.pixels, self.questions, self.answers = None, [], []

    @property
    def history(self) -> list[tuple[str, str]]:
        return list(zip(self.questions, self.answers))

    def prompt_for(self, question: str) -> str:
        """The text the LLM gets to answer `question` after the conversation so far."""
        return self.template.render(self.questions + [question], self.answers, with_image=self.pixels is not None)

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


def chat(model, image, question: str, template: str | Mapping | ChatTemplate = "stage4", **generation) -> str:
    """One question about one image (None: a text-only question); returns the answer."""
    session = Chat(model, template, GenerationSettings(**generation))
    if image is not None:
        session.upload_image(image)
    return session.ask(question)
