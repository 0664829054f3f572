"""The web demo end to end in headless Chromium: upload an image, ask, see the answer stream in.

Needs gradio (the `[demo]` extra), Playwright for Python (`pip install playwright`, no browser
download) and Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`); skipped,
saying which is missing, otherwise.
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
from PIL import Image

from conftest import tiny_model_section

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
# headless as root on a closed network: no sandbox, no GPU, no background connections
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 60_000  # every browser wait is bounded

gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[demo])")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_url(tmp_path):
    """The demo on the tiny model, whose greedy answer is always ' circle', on a free local port.
    Yields (url, the list of prompts the model was asked); stops the server afterwards."""
    from tinygpt_v.inference import Chat, GenerationSettings, InferenceSettings, prepare_model
    from tinygpt_v.inference.web_demo import build_demo
    from tinygpt_v.models import build_model
    from test_inference_chat import Recorder, always_say

    torch.manual_seed(0)
    model = prepare_model(build_model(tiny_model_section(end_sym="###"), verbose=False), InferenceSettings(device="cpu"))
    always_say(model, " circle")
    model.generate = Recorder(model.generate)
    generation = GenerationSettings(max_new_tokens=4)
    demo = build_demo(lambda: Chat(model, "stage1-3", generation), generation)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False)
    try:
        yield f"http://127.0.0.1:{port}/", model.generate.calls
    finally:
        demo.close()


def test_upload_ask_and_see_the_answer(demo_url, tmp_path):
    url, calls = demo_url
    image = tmp_path / "red_circle.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True, timeout=WAIT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#image img").first.wait_for(state="visible")  # the upload has arrived
            page.locator("#question textarea").fill("What shape is it?")
            page.locator("#send").click()
            playwright.expect(page.locator("#chatbot")).to_contain_text("circle circle circle circle",
                                                                        timeout=WAIT_MS)
            playwright.expect(page.locator("#chatbot")).to_contain_text("What shape is it?")
        finally:
            browser.close()
    (images, prompts), _ = calls[-1]
    assert prompts == ["###Human: <Img><ImageHere></Img> What shape is it? ###Assistant: "]
    assert images is not None and images.shape == (1, 3, 112, 112)
