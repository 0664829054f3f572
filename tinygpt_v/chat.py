"""Terminal chat with a TinyGPT-V model, and batch prediction.

    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml [--image photo.jpg] [--options ...]
    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml \\
        --batch questions.jsonl --output answers.jsonl           # or --batch photos/ --question "..."

In the chat, type a question, or a command:
    /image PATH   look at a new image (starts a new conversation)
    /reset        forget the conversation (and the image)
    /quit         leave (so does Ctrl-D)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

COMMANDS = "commands: /image PATH, /reset, /quit"


def load_chat_config(cfg_path: str, options: Iterable[str] = ()):
    """(model ready for inference, InferenceSettings) from a config with `model:` and `inference:`."""
    from .config import load_config
    from .inference import load_model, read_inference_settings  # registers the `inference:` section
    cfg = load_config(cfg_path, list(options))
    settings = read_inference_settings(cfg.get("inference"))
    return load_model(cfg.model, settings), settings


def run_terminal(chat, lines: Iterable[str], out: TextIO) -> None:
    """The chat loop over input `lines`; answers are streamed to `out` as they are produced."""
    out.write(f"{COMMANDS}\n")
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            out.write("(conversation reset)\n")
        elif line.startswith("/image"):
            _load_image(chat, line[len("/image"):].strip(), out)
        elif line.startswith("/"):
            out.write(f"unknown command; {COMMANDS}\n")
        else:
            _answer(chat, line, out)
        out.flush()


def _load_image(chat, path: str, out: TextIO) -> None:
    try:
        chat.upload_image(path)
    except (OSError, ValueError) as e:  # a typo in a path should not end the session
        out.write(f"cannot read image {path!r}: {e}\n")
        return
    out.write(f"(new conversation about {path})\n")


def _answer(chat, question: str, out: TextIO) -> None:
    """Print the answer as it grows; a snapshot that rewrites earlier text is printed anew."""
    out.write("Assistant: ")
    shown = ""
    for answer in chat.ask_stream(question):
        if answer.startswith(shown):
            out.write(answer[len(shown):])
        else:
            out.write(f"\nAssistant: {answer}")
        shown = answer
        out.flush()
    out.write("\n")


def _input_lines(prompt: str = "You: ") -> Iterable[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def run_batch(model, settings, source: str, question: str | None, output: str, batch_size: int) -> int:
    from .inference import predict, read_requests, write_jsonl
    requests = read_requests(source, question)
    results = predict(model, requests, settings.template, settings.generation_settings, batch_size,
                      settings.image_size)
    return write_jsonl(results, output)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", required=True, help="config with `model:` and `inference:` sections")
    p.add_argument("--options", nargs="*", default=[], help="overrides, e.g. inference.quantization=int8")
    p.add_argument("--image", help="image to start the chat with")
    p.add_argument("--batch", help="jsonl of {image, question[, id]} or a folder of images: answer them all")
    p.add_argument("--question", help="with --batch: the question (for a folder, or jsonl lines without one)")
    p.add_argument("--output", default="answers.jsonl", help="with --batch: where the answers go")
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, settings = load_chat_config(args.cfg_path, args.options)
    if args.batch:
        count = run_batch(model, settings, args.batch, args.question, args.output, args.batch_size)
        print(f"{count} answers written to {args.output}")
        return
    from .inference import Chat
    chat = Chat(model, settings.template, settings.generation_settings, settings.image_size)
    if args.image:
        _load_image(chat, args.image, sys.stdout)
    run_terminal(chat, _input_lines(), sys.stdout)


if __name__ == "__main__":
    main()
