"""The original TinyGPT-V evaluation protocol: its prompt strings and its generation settings.

A benchmark entry with `protocol: original` builds, for each sample, the exact string the
original's scripts hand to `model.generate` (DLYuanGod/TinyGPT-V at commit 83f6189b:
`eval_vqa.py`, `eval_ref.py`, `minigpt4/common/eval_utils.prepare_texts`), and the runner
generates with the original's settings (`ORIGINAL_GENERATION`). With the default
`protocol: ours` the sample holds the bare instruction and the model applies its own template.

Prompt. `prepare_texts` wraps `'<Img><ImageHere></Img> {question}'` in `CONV_VISION_minigptv2`
with `system = ""`; in TinyGPT-V that conversation has roles ("Human: ", "Assistant: ") and
separator "###" (SeparatorStyle.SINGLE), so the model receives
`"###Human: <Img><ImageHere></Img> {question}###Assistant: "` (not MiniGPT-v2's `[INST] ... [/INST]`).
IconQA builds its own: `"###Human: <Img><ImageHere></Img> {question} ###Assistant: "` and ranks
candidates with `multi_select`. tests/fixtures/scorers/prompts.json holds the strings the
original's code built (tests/fixtures/make_benchmark_scorer_fixtures.py).

Generation. The scripts call `model.generate(images, texts, max_new_tokens=20, do_sample=False)`
(VizWiz adds repetition_penalty=1.0); `minigpt_base.generate` passes num_beams=1, min_length=1,
top_p=0.9, repetition_penalty=1, length_penalty=1, temperature=1 to Hugging Face `generate` on
input embeddings, with its stopping criteria commented out: generation runs to EOS or
max_new_tokens and does not stop at "###". With input embeddings only, transformers 4.36 counts
min_length from the first new token, so EOS is barred as the first token: `min_new_tokens=1`
here (newer transformers subtract the prompt length from min_length, which would drop the rule).
The decoded text (special tokens skipped) is cut at "</s>", "<s>" is removed, what follows
"[/INST]" is kept and stripped; each script then applies its own clean-up (see
`tinygpt_v.evaluation.scoring`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..models.tinygpt_v import decode_like_original  # noqa: F401  (re-exported: the protocol's decoding)

IMAGE_SLOT = "<Img><ImageHere></Img>"
# CONV_VISION_minigptv2 (system "") after prepare_texts: sep + role + message + sep + role.
CONVERSATION = "###Human: {}###Assistant: "
ICONQA_INSTRUCTION = "###Human: " + IMAGE_SLOT + " {} ###Assistant: "

# Keyword arguments for TinyGPTV.generate in the original protocol (max_new_tokens comes from
# the benchmark entry; the original's benchmark_evaluation.yaml sets 20 everywhere).
ORIGINAL_GENERATION = {"apply_template": False, "add_bos": False, "stop_at_end_sym": False, "min_new_tokens": 1,
                       "do_sample": False, "num_beams": 1, "top_p": 0.9, "temperature": 1.0,
                       "repetition_penalty": 1.0}

# Keyword arguments for TinyGPTV.score_candidates in the original protocol: `multi_select` ranks
# candidates by `forward`'s loss, the mean token loss over candidate + end_sym. The evaluation
# config (eval_configs/benchmark_evaluation.yaml) sets no end_sym and no chat_template, so the
# model's defaults apply: end_sym "\n", and the prompt string is used as it is.
ORIGINAL_SCORING = {"apply_template": False, "suffix": "\n", "mean": True}


def conversation_prompt(question: str) -> str:
    """The full prompt `prepare_texts` builds for one question."""
    return CONVERSATION.format(f"{IMAGE_SLOT} {question}")




@dataclass(kw_only=True)
class Protocol:
    """Mixin for benchmarks: `protocol: original` builds the original's prompts (and, through
    the runner, its generation settings); `ours` (default) the bare instruction."""
    protocol: Literal["ours", "original"] = "ours"

    def __post_init__(self) -> None:
        if self.protocol not in ("ours", "original"):
            raise ValueError(f"protocol should be 'ours' or 'original', got {self.protocol!r}")

    @property
    def original_protocol(self) -> bool:
        return self.protocol == "original"

    def build_prompt(self, instruction: str) -> str:
        """The sample's prompt: the original's full conversation string, or ours."""
        return conversation_prompt(instruction) if self.original_protocol else f"{IMAGE_SLOT} {instruction}"
