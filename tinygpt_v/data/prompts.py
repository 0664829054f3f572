"""Instruction templates per task, with MiniGPT-v2's task tags.

A tag at the start of the instruction tells the model which task it is doing, so one model
can answer `[vqa]` briefly, give a box for `[refer]` and a long description for `[grounding]`.
Every dataset draws one template per sample from its pool (with the sample's seeded rng).
Pools of your own can be given in a text file, one template per line (`prompt_file:` in a
dataset's config); the shipped files live in `tinygpt_v/prompts/`.

The pools and the image wrapping are the original's (its `minigpt4/datasets/datasets/*.py`,
checked against them by tests/test_fidelity_data.py): every stage-4 instruction is
`"<Img><ImageHere></Img> {} ".format(instruction)`, with the space before and after.
"""
from __future__ import annotations

import os
from importlib import resources

from ..registry import ConfigError
from .base import IMAGE_PLACEHOLDER


def image_instruction(instruction: str) -> str:
    """The original's stage-4 wrapping, trailing space included: `<Img><ImageHere></Img> {} `."""
    return f"{IMAGE_PLACEHOLDER} {instruction} "

VQA = [
    "[vqa] {}",
    "[vqa] Based on the image, respond to this question with a short answer: {}",
]

REFER = [  # {} = the referring expression; the answer is its box
    "[refer] {}",
    "[refer] give me the location of {}",
    "[refer] where is {} ?",
    "[refer] from this image, tell me the location of {}",
    "[refer] the location of {} is",
    "[refer] could you tell me the location for {} ?",
    "[refer] where can I locate the {} ?",
]

IDENTIFY = [  # {} = a box; the answer is the expression (the inverse referring task)
    "[identify] {}",
    "[identify] what object is in this location {}",
    "[identify] identify the object present at this location {}",
    "[identify] what is it in {}",
    "[identify] describe this object in {}",
    "[identify] this {} is",
    "[identify] the object in {} is",
]

GROUNDED_CAPTION = [  # the answer is a caption with <p>phrase</p> {box} after each object
    "[grounding] please describe this image in details",
    "[grounding] describe this image as detailed as possible",
    "[grounding] summarize this image in details",
    "[grounding] give a thorough description of what you see in this image",
]

DETECTION = [  # {} = a caption or a phrase; the answer lists <p>phrase</p> {box} for each
    "[detection] {}",
]

CAPTION = [  # TextCaps (the original's text_caps.py pool, trailing spaces as written there)
    "[caption] Briefly describe this image.",
    "[caption] Provide a concise depiction of this image.",
    "[caption] Present a short description of this image.",
    "[caption] Summarize this image in a few words.",
    "[caption] A short image caption:",
    "[caption] A short image description:",
    "[caption] A photo of ",
    "[caption] An image that shows ",
    "[caption] Write a short description for the image. ",
    "[caption] Write a description for the photo.",
    "[caption] Provide a description of what is presented in the photo.",
    "[caption] Briefly describe the content of the image.",
    "[caption] Can you briefly explain what you see in the image?",
    "[caption] Could you use a few words to describe what you perceive in the photo?",
    "[caption] Please provide a short depiction of the picture.",
    "[caption] Using language, provide a short account of the image.",
    "[caption] Use a few words to illustrate what is happening in the picture.",
]


def load_prompt_file(path: str | None, key: str = "prompt_file", default: str = "alignment.txt") -> list[str]:
    """Templates from a text file, one a line (blank lines and `# ` comment lines ignored);
    `None` reads the shipped `tinygpt_v/prompts/<default>`. Each must hold `<ImageHere>`
    exactly once. Lines are used as written apart from the line break (the original reads
    them with `splitlines()`), so a trailing space in a template is kept."""
    if path is None:
        text = resources.files("tinygpt_v").joinpath("prompts", default).read_text(encoding="utf-8")
        path = f"tinygpt_v/prompts/{default}"
    else:
        if not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(key, f"prompt file does not exist: {path}")
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            text = f.read()
    prompts = [line for line in text.splitlines() if line.strip() and not _is_comment(line)]
    if not prompts:
        raise ConfigError(key, f"{path}: no prompts")
    for lineno, prompt in enumerate(prompts, 1):
        if prompt.count("<ImageHere>") != 1:
            raise ConfigError(key, f"{path}: prompt {lineno} must contain <ImageHere> exactly once: {prompt!r}")
    return prompts


def _is_comment(line: str) -> bool:
    # "# note" is a comment; "###Human: <Img><ImageHere></Img> ..." is a template
    return line.startswith("# ") and "<ImageHere>" not in line
