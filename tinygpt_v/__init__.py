"""TinyGPT-V: a framework for training and running small multimodal LLMs."""
__version__ = "0.1.0"
