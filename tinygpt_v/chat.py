"""Terminal chat with a TinyGPT-V model, and batch prediction.

    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml [--image photo.jpg] [--options ...]
    python -m tinygpt_v.chat --checkpoint output/demo/stage4/checkpoint_final --image photo.jpg
    python -m tinygpt_v.chat --cfg-path eval_configs/chat_stage4.yaml \\
        --batch questions.jsonl --output answers.jsonl           # or --batch photos/ --question "..."

`--checkpoint` (or `inference.checkpoint`) is an exported folder, our trainer checkpoint, or the
original's .pth. Without a `model:` section (no --cfg-path, or a config with only `inference:`)
the model comes from the checkpoint: an exported folder rebuilds itself, a trainer checkpoint's
meta.json says its model section. A `model:` section that differs from the one the checkpoint
was trained with is refused, naming the keys.

In the chat, type a question, or a command (line editing and history with the arrow keys):
    /image PATH   look at a new image (starts a new conversation)
    /reset        forget the conversation; the image stays (the next question is about it)
    /quit         leave (so do Ctrl-D and Ctrl-C)
A question asked with no image is answered without one, with a reminder to attach one.

A bad image (missing, unreadable, truncated, a decompression bomb) or a question that does not
fit the model's context is reported and the session goes on; a long conversation keeps its
newest turns (see tinygpt_v.inference.conversation).

With --batch, bad requests (a malformed jsonl line, named by file and line; a bad image; a
question too long) are skipped and listed on stderr, the others answered. Answers are appended
to --output: a second run over the same requests asks only those not answered yet (by id), so
an interrupted batch resumes. The exit status is 0 when every request has its answer, 1 when
some were skipped or the model cannot be loaded (one line on stderr: a bad or mismatched
checkpoint, a missing file, a full disk), 2 for a config error.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

COMMANDS = "commands: /image PATH, /reset, /quit"
ATTACH = "attach one with /image PATH"


def load_chat_config(cfg_path: str | None, options: Iterable[str] = (), checkpoint: str | None = None):
    """(model ready for inference, InferenceSettings) from a config with `model:` and/or
    `inference:`, or from a checkpoint alone (see the module docstring)."""
    from omegaconf import OmegaConf

    from .config import load_config, resolve_config_path, validate_config
    from .inference import load_model, read_inference_settings  # registers the `inference:` section
    options = list(options) + ([f"inference.checkpoint={checkpoint}"] if checkpoint else [])
    if cfg_path:
        cfg = load_config(resolve_config_path(cfg_path), options)
    else:
        cfg = OmegaConf.from_dotlist(options)
        validate_config(cfg, {key.split("=", 1)[0]: "--options" for key in options})
    settings = read_inference_settings(cfg.get("inference"))
    return load_model(cfg.model if "model" in cfg else None, settings), settings


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
            chat.clear_history()
            still = "the image stays" if chat.has_image else f"no image yet: {ATTACH}"
            out.write(f"(conversation reset; {still})\n")
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
    if not chat.has_image:
        out.write(f"(no image: answering without one; {ATTACH})\n")
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
    """Lines typed at the prompt, which goes to stdout. readline (when the platform has it) gives
    line editing and an in-session history on the arrow keys; Ctrl-D ends, Ctrl-C too (quietly)."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() edit lines)
    except ImportError:  # Windows without pyreadline: plain input
        pass
    while True:
        try:
            if sys.stdin.isatty() and sys.stdout.isatty():
                line = input(prompt)  # with readline, the prompt is drawn on stdout by readline
            else:
                sys.stdout.write(prompt)
                sys.stdout.flush()
                line = input()
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        yield line


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
    p.add_argument("--cfg-path", help="config with `model:` and/or `inference:` sections (optional with --checkpoint)")
    p.add_argument("--checkpoint", help="an exported folder, a trainer checkpoint or the original's .pth "
                                        "(sets inference.checkpoint; without `model:` the model comes from it)")
    p.add_argument("--options", nargs="*", default=[], help="overrides, e.g. inference.quantization=int8")
    p.add_argument("--image", help="image to start the chat with")
    p.add_argument("--batch", help="jsonl of {image, question[, id]} or a folder of images: answer them all")
    p.add_argument("--question", help="with --batch: the question (for a folder, or jsonl lines without one)")
    p.add_argument("--output", default="answers.jsonl", help="with --batch: where the answers go")
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def lacks_model_source(args) -> bool:
    """True (after one line on stderr) when neither a config nor a checkpoint names the model."""
    if args.cfg_path or args.checkpoint:
        return False
    print("error: give --cfg-path (a config with `model:`) or --checkpoint (an exported folder or a trainer "
          "checkpoint)", file=sys.stderr)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if lacks_model_source(args):
        return 2
    from .cli.errors import quiet_harmless_warnings, run_reporting
    quiet_harmless_warnings()
    loaded = {}

    def load() -> int:
        loaded["model"], loaded["settings"] = load_chat_config(args.cfg_path, args.options, args.checkpoint)
        if args.batch:
            return run_batch(loaded["model"], loaded["settings"], args.batch, args.question, args.output,
                             args.batch_size)
        return 0

    # a bad weight file, a missing --batch file, a bad image folder, a full disk: one line
    status = run_reporting(load, expected=(OSError, ValueError))
    if status or args.batch:
        return status
    from .inference import Chat
    model, settings = loaded["model"], loaded["settings"]
    chat = Chat(model, settings.template, settings.generation_settings, settings.image_size,
                settings.max_image_pixels)
    if args.image:
        _load_image(chat, args.image, sys.stdout)
    try:
        run_terminal(chat, _input_lines(), sys.stdout)
    except KeyboardInterrupt:  # Ctrl-C while an answer streams: leave without a traceback
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
