"""Token streaming: the answer so far, while the LLM is still producing it.

`stream_generate` runs `TinyGPTV.generate` in a thread with transformers' TextIteratorStreamer
and yields the cleaned answer each time it grows: each item replaces the previous one (what a
chat window shows), and the last item is exactly what `generate` would have returned. Text that
may be the start of end_sym is held back until the next piece shows whether it is.
"""
from __future__ import annotations

from collections.abc import Iterator
from threading import Thread

import torch

STREAM_TIMEOUT_S = 600.0  # the longest wait for one piece of text before giving up


def stream_generate(model, images: torch.Tensor | None, prompt: str, apply_template: bool = True,
                    **generate_kwargs) -> Iterator[str]:
    """Yield the growing answer to one prompt; the last item is the whole answer."""
    if generate_kwargs.get("num_beams", 1) > 1:
        # beam search settles on its answer only at the end: there is nothing to stream
        yield model.generate(images, [prompt], apply_template=apply_template, **generate_kwargs)[0]
        return
    from transformers import TextIteratorStreamer
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=STREAM_TIMEOUT_S)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(images, [prompt], apply_template=apply_template, streamer=streamer, **generate_kwargs)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)
            streamer.end()  # unblock the reader

    thread = Thread(target=run, daemon=True)
    thread.start()
    raw, shown = "", ""
    for piece in streamer:
        raw += piece
        answer = model.clean_answer(_hold_back_partial_stop(raw, model.end_sym))
        if answer != shown:
            yield answer
            shown = answer
    thread.join()
    if errors:
        raise errors[0]
    final = model.clean_answer(raw)
    if final != shown or not final:  # the last item is always the answer, even an empty one
        yield final


def _hold_back_partial_stop(text: str, stop: str) -> str:
    """`text` without a tail that could still become `stop` (e.g. '##' before '###')."""
    if stop and stop not in text:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return text[:-k]
    return text
