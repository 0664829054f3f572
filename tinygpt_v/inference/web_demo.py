"""Web demo (Gradio): upload an image, chat about it, with sliders for temperature, beams and
answer length. Needs the `[demo]` extra (`pip install tinygpt_v[demo]`).

    python scripts/web_demo.py --cfg-path eval_configs/chat_stage4.yaml [--port 7860] [--options ...]
    python scripts/web_demo.py --checkpoint path/to/exported_folder     # the model from the checkpoint

Task tags (MiniGPT-v2's, which stage 4 trains: [vqa], [refer], [grounding], ...) are buttons
that put the tag in front of the question. Boxes in an answer (`{<x1><y1><x2><y2>}` on the
0-100 grid, as [refer] and [grounding] answer) are drawn on the image beside the chat, with
the phrase they belong to as the label.

Served on 127.0.0.1 unless `--host` says otherwise: the demo has no authentication.
Each browser session holds its own `Chat` (history and image); the model is shared and
answers one question at a time.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from dataclasses import dataclass

from .conversation import Chat
from .settings import GenerationSettings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

TITLE = "TinyGPT-V"
HELP = ("Upload an image, then ask about it. A new image starts a new conversation. Start a question "
        "with a task tag (the buttons) to say what kind of answer you want; boxes in an answer are "
        "drawn on the image.")
# MiniGPT-v2's task tags, as the stage-4 data writes them (tinygpt_v/data/prompts.py, grounding.py)
TASK_TAGS = {
    "[vqa]": "a short answer",
    "[caption]": "a short description",
    "[grounding]": "a description with a box for each object",
    "[refer]": "the box of the object you describe",
    "[identify]": "what is in the box you give as {<x1><y1><x2><y2>}",
    "[detection]": "the boxes of the objects you name",
}
_BOX_TEXT = re.compile(r"\{[^{}]*\}")
_PHRASE = re.compile(r"<p>([^<]*)</p>\s*$")


def answer_boxes(answer: str) -> list[tuple[tuple[int, int, int, int], str]]:
    """((x1, y1, x2, y2) on the 0-100 grid, label) for each box in an answer; the label is the
    `<p>phrase</p>` just before the box ([grounding]), else empty. Each `{...}` is read by the
    scorer's own parser (evaluation.scoring.parse_grid_box)."""
    from ..evaluation.scoring import parse_grid_box
    boxes, start = [], 0
    for match in _BOX_TEXT.finditer(answer):
        box = parse_grid_box(match.group())
        if box is not None:
            phrase = _PHRASE.search(answer[start:match.start()])
            boxes.append((box, phrase.group(1).strip() if phrase else ""))
        start = match.end()
    return boxes


def draw_boxes(image, answer: str):
    """A copy of `image` with the answer's boxes drawn (None when the answer has none)."""
    from PIL import ImageDraw

    from ..evaluation.scoring import grid_to_pixels
    boxes = answer_boxes(answer)
    if image is None or not boxes:
        return None
    drawn = image.convert("RGB").copy()
    pen = ImageDraw.Draw(drawn)
    colours = ("red", "lime", "blue", "yellow", "magenta", "cyan")
    for n, (box, label) in enumerate(boxes):
        x1, y1, x2, y2 = grid_to_pixels(box, *drawn.size)
        colour = colours[n % len(colours)]
        pen.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour,
                      width=max(2, drawn.width // 150))
        if label:
            pen.text((min(x1, x2) + 3, min(y1, y2) + 2), label, fill=colour)
    return drawn


def with_tag(question: str, tag: str) -> str:
    """`tag` in front of the question, replacing a task tag already there."""
    question = (question or "").strip()
    for known in TASK_TAGS:
        if question.startswith(known):
            question = question[len(known):].lstrip()
    return f"{tag} {question}" if question else f"{tag} "


@dataclass
class Session:
    """One browser session: its chat, and which image that chat is about."""
    chat: Chat
    image_key: str | None = None


def image_key(image) -> str | None:
    """A fingerprint of the uploaded image. Every message carries the image shown, and a
    conversation is restarted when it changed: no separate upload event can race a question."""
    if image is None:
        return None
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def build_demo(new_chat, generation: GenerationSettings | None = None):
    """The Gradio app. `new_chat()` returns a fresh `Chat` for a browser session."""
    import gradio as gr
    defaults = generation or GenerationSettings()

    def on_send(question, image, messages, session, temperature, num_beams, max_new_tokens):
        question = (question or "").strip()
        if not question:
            yield "", messages, session, None
            return
        session = session or Session(new_chat())
        key = image_key(image)
        if key != session.image_key or not messages:  # new image, or the chat window was cleared
            session.chat.reset()
            if image is not None:
                session.chat.upload_image(image)
            session.image_key, messages = key, []
        messages = messages + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            session.chat.prompt_for(question)  # too long for the context, or holding the image marker
        except ValueError as e:
            messages[-1] = {"role": "assistant", "content": f"(cannot ask that: {e})"}
            yield question, messages, session, None
            return
        answer = ""
        for answer in session.chat.ask_stream(question, temperature=float(temperature), num_beams=int(num_beams),
                                              max_new_tokens=int(max_new_tokens)):
            messages[-1] = {"role": "assistant", "content": answer}
            yield "", messages, session, None
        yield "", messages, session, draw_boxes(image, answer)

    def on_reset():
        return None, [], None, None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{HELP}")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="image")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.1,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                num_beams = gr.Slider(1, 5, value=defaults.num_beams, step=1, label="Beams", elem_id="beams")
                max_new_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
                reset = gr.Button("Reset", elem_id="reset")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480)
                with gr.Row():
                    tag_buttons = {tag: gr.Button(tag, size="sm", elem_id=f"tag-{tag.strip('[]')}")
                                   for tag in TASK_TAGS}
                gr.Markdown(" · ".join(f"`{tag}` {what}" for tag, what in TASK_TAGS.items()))
                question = gr.Textbox(placeholder="Ask about the image and press Enter, e.g. [vqa] what is on the "
                                                  "table?", show_label=False, elem_id="question")
                send = gr.Button("Send", variant="primary", elem_id="send")
                boxes = gr.Image(type="pil", label="Boxes in the last answer", elem_id="boxes", interactive=False)

        for tag, button in tag_buttons.items():
            button.click(lambda text, tag=tag: with_tag(text, tag), question, question)
        send_inputs = [question, image, chatbot, session, temperature, num_beams, max_new_tokens]
        send_outputs = [question, chatbot, session, boxes]
        # one model, one generation at a time, whichever session asks
        send.click(on_send, send_inputs, send_outputs, concurrency_id="model")
        question.submit(on_send, send_inputs, send_outputs, concurrency_id="model")
        reset.click(on_reset, None, [session, chatbot, image, boxes])
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", help="config with `model:` and/or `inference:` sections (optional with --checkpoint)")
    p.add_argument("--checkpoint", help="an exported folder, a trainer checkpoint or the original's .pth")
    p.add_argument("--options", nargs="*", default=[], help="overrides, e.g. inference.quantization=int8")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Start the demo; a failure to start (config, checkpoint, missing gradio) is one line and
    a non-zero exit status, as in the terminal chat."""
    from ..chat import lacks_model_source, load_chat_config
    from ..cli.errors import quiet_harmless_warnings, run_reporting
    args = parse_args(argv)
    if lacks_model_source(args):
        return 2
    quiet_harmless_warnings()
    loaded = {}

    def load() -> None:
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError("the web demo needs gradio: pip install 'tinygpt_v[demo]'") from None
        loaded["model"], loaded["settings"] = load_chat_config(args.cfg_path, args.options, args.checkpoint)

    status = run_reporting(load, expected=(OSError, ValueError, ImportError))
    if status:
        return status
    model, settings = loaded["model"], loaded["settings"]
    generation = settings.generation_settings

    def new_chat() -> Chat:
        return Chat(model, settings.template, generation, settings.image_size)

    build_demo(new_chat, generation).queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
