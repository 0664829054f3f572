"""Tokenizers: a pretrained one (Phi-2's, from a folder or hub id), or a small byte-level BPE
trained on the spot, so tests and the offline demo never need a download."""
from __future__ import annotations

import functools

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..registry import TOKENIZERS, LocalPath, PathOrHubId

ENDOFTEXT = "<|endoftext|>"  # Phi-2's bos = eos = pad


@TOKENIZERS.register("hf")
def hf_tokenizer(path: PathOrHubId) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # Phi-2 ships none; the original pads with eos
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:  # Qwen2.5 ships none; every sequence here starts with one (Phi-2: BOS = pad)
        tokenizer.bos_token = tokenizer.pad_token
    return tokenizer


@TOKENIZERS.register("toy_bpe")
def toy_bpe(vocab_size: int = 1024, corpus_files: list[LocalPath] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style, like Phi-2's) trained on a built-in English/toy-world
    corpus plus optional files. Byte-level means any text is encodable; the merges only
    make common words short. Deterministic for the same inputs."""
    return _train_toy_bpe(vocab_size, tuple(corpus_files or ()))


@functools.lru_cache(maxsize=4)
def _train_toy_bpe(vocab_size: int, corpus_files: tuple[str, ...]) -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    lines = list(BUILTIN_CORPUS)
    for file in corpus_files:
        with open(file, encoding="utf-8") as f:
            lines += f.read().splitlines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=[ENDOFTEXT], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=ENDOFTEXT,
                                   eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT)


_WORDS = ("red green blue yellow purple orange white black gray brown pink cyan "
          "circle square triangle star cross rectangle ellipse diamond shape shapes object objects "
          "left right top bottom above below middle center next to of the a an is are there "
          "how many what which where colour color size big small large tiny image picture photo "
          "yes no true false one two three four five six seven eight nine ten zero "
          "describe this in detail please answer question short caption box region refer grounding "
          "background foreground on in at with and or not it its you can see").split()
BUILTIN_CORPUS: tuple[str, ...] = tuple(
    [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 6)]
    + [f"{w} {w.capitalize()} {w}s {w}." for w in _WORDS]
    + ["###Human: <Img><ImageHere></Img> ###Assistant: ###", "[INST] <Img><ImageHere></Img> [/INST]",
       "[vqa] [caption] [refer] [grounding] [identify] [detection]",
       "{<10><20><30><40>} <p>object</p> {<0><0><100><100>}", "Instruct: Output: /n",
       "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100"]
)
