"""Inference: conversation templates, multi-turn chat, streaming, batch prediction, low-memory
loading (fp16/bf16, int8/nf4 LLM, vision encoder on the CPU). The web demo lives in
`tinygpt_v.inference.web_demo` (needs the `[demo]` extra); the terminal chat is `python -m tinygpt_v.chat`."""
from .batch import Request, RequestError, answered_ids, predict, read_requests, write_jsonl
from .conversation import Chat, PromptTooLong, chat
from .images import ImageError, image_processor, to_pixels
from .loading import load_model, merged_llm, prepare_model, quantize_llm
from .settings import GenerationSettings, InferenceSettings, read_inference_settings
from .streaming import stream_generate
from .templates import TEMPLATES, ChatTemplate, get_template

__all__ = ["Chat", "chat", "ChatTemplate", "TEMPLATES", "get_template", "GenerationSettings", "InferenceSettings",
           "read_inference_settings", "load_model", "prepare_model", "quantize_llm", "merged_llm",
           "stream_generate", "Request", "RequestError", "read_requests", "predict", "write_jsonl", "answered_ids",
           "image_processor", "to_pixels", "ImageError", "PromptTooLong"]
