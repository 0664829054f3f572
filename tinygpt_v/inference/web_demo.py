"""Web demo (Gradio): upload an image, chat about it, with sliders for temperature, beams and
answer length. Needs the `[demo]` extra (`pip install tinygpt_v[demo]`).

    python scripts/web_demo.py --cfg-path eval_configs/chat_stage4.yaml [--port 7860] [--options ...]

Served on 127.0.0.1 unless `--host` says otherwise: the demo has no authentication.
Each browser session holds its own `Chat` (history and image); the model is shared and
answers one question at a time.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass

from .conversation import Chat
from .settings import GenerationSettings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

TITLE = "TinyGPT-V"
HELP = "Upload an image, then ask about it. A new image starts a new conversation."


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
            yield "", messages, session
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
            yield question, messages, session
            return
        for answer in session.chat.ask_stream(question, temperature=float(temperature), num_beams=int(num_beams),
                                              max_new_tokens=int(max_new_tokens)):
            messages[-1] = {"role": "assistant", "content": answer}
            yield "", messages, session

    def on_reset():
        return None, [], None

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
                question = gr.Textbox(placeholder="Ask about the image and press Enter",
                                      show_label=False, elem_id="question")
                send = gr.Button("Send", variant="primary", elem_id="send")

        send_inputs = [question, image, chatbot, session, temperature, num_beams, max_new_tokens]
        send_outputs = [question, chatbot, session]
        # one model, one generation at a time, whichever session asks
        send.click(on_send, send_inputs, send_outputs, concurrency_id="model")
        question.submit(on_send, send_inputs, send_outputs, concurrency_id="model")
        reset.click(on_reset, None, [session, chatbot, image])
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", required=True, help="config with `model:` and `inference:` sections")
    p.add_argument("--options", nargs="*", default=[], help="overrides, e.g. inference.quantization=int8")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from ..chat import load_chat_config
    args = parse_args(argv)
    model, settings = load_chat_config(args.cfg_path, args.options)
    generation = settings.generation_settings

    def new_chat() -> Chat:
        return Chat(model, settings.template, generation, settings.image_size)

    build_demo(new_chat, generation).queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False)


if __name__ == "__main__":
    main()
