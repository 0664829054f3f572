"""Terminal chat with a TinyGPT-V model, and batch prediction.

    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml [--image photo.jpg] [--options ...]
    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml \\
        --batch questions.jsonl --output answers.jsonl           # or --batch photos/ --question "..."

In the chat, type a question, or a command:
    /image PATH   look at a new image (starts a new conversation)
    /reset        forget the conversation (and the image)
    /quit         leave (so does Ctrl-D)

A bad image (missing, unreadable, truncated, a decompression bomb) or a question that does not
fit the model's context is reported and the session goes on; a long conversation keeps its
newest turns (see tinygpt_v.inference.conversation).

With --batch, bad requests (a malformed jsonl line, named by file and line; a bad image; a
question too long) are skipped and listed on stderr, the others answered. Answers are appended
to --output: a second run over the same requests asks only those not answered yet (by id), so
an interrupted batch resumes. The exit status is 0 when every request has its answer, 1 when
some were skipped, 2 for a config error.
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
    except (OSError, ValueError) as e:  # a typo in a path or a bad image should not end the session
        out.write(f"cannot read image {path!r}: {e}\n")
        return
    out.write(f"(new conversation about {path})\n")


def _answer(chat, question: str, out: TextIO) -> None:
    """Print the answer as it grows; a snapshot that rewrites earlier text is printed anew."""
    try:
        chat.prompt_for(question)  # a question that cannot be asked is reported before "Assistant:"
    except ValueError as e:
        out.write(f"cannot ask that: {e}\n")
        return
    dropped = chat.dropped_turns
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
    if dropped:
        out.write(f"(the oldest {dropped} turn(s) no longer fit in the model's context and were left out)\n")


def _input_lines(prompt: str = "You: ") -> Iterable[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def run_batch(model, settings, source: str, question: str | None, output: str, batch_size: int,
              err: TextIO = sys.stderr) -> int:
    """Answer the requests not yet in `output`, appending; returns the exit status (1: some skipped)."""
    from .inference import answered_ids, predict, read_requests, write_jsonl
    errors: list = []
    requests = read_requests(source, question, errors)
    done = answered_ids(output)
    todo = [r for r in requests if r.id not in done]
    results = predict(model, todo, settings.template, settings.generation_settings, batch_size,
                      settings.image_size, errors=errors, max_image_pixels=settings.max_image_pixels)
    count = write_jsonl(results, output, append=True)
    for error in errors:
        err.write(f"skipped {error}\n")
    kept = f" (kept {len(done)} from an earlier run)" if done else ""
    skipped = f"; {len(errors)} request(s) skipped, listed above" if errors else ""
    print(f"{count} answers written to {output}{kept}{skipped}", flush=True)
    return 1 if errors else 0


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from .checkpoints import CheckpointError
    from .registry import ConfigError
    try:
        model, settings = load_chat_config(args.cfg_path, args.options)
        if args.batch:
            return run_batch(model, settings, args.batch, args.question, args.output, args.batch_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError) as e:  # a bad weight file, a missing --batch file, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    from .inference import Chat
    chat = Chat(model, settings.template, settings.generation_settings, settings.image_size,
                settings.max_image_pixels)
    if args.image:
        _load_image(chat, args.image, sys.stdout)
    try:
        run_terminal(chat, _input_lines(), sys.stdout)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
