"""TinyGPTV: vision encoder -> ln_vision -> Q-Former -> connector -> causal LM.

The text/image splice follows the original (its `minigpt_base`): a prompt holds the literal
`<ImageHere>`; text on either side is tokenised without special tokens, and the image
embeddings (32 with a Q-Former) take the marker's place. A training sequence is

    [BOS] template(prompt_1) | answer_1 end_sym [BOS] template(prompt_2) answer_2 end_sym ...

where everything right of `|` is the "regressed" part: answers are targets, later questions
(each after its own BOS) are not. As in the original, the prompt part is capped at
`max_context_len` tokens and the regressed part at `max_txt_len` tokens (all turns together),
so an over-long prompt never cuts the answer away. In a conversation (several turns) the
later BOS tokens get attention mask 0, because the original masks every id equal to the pad
id there and Phi-2's pad = BOS = EOS. Training batches are right padded; generation batches
are left padded so every prompt ends where generation starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IMAGE_MARKER = "<ImageHere>"
IGNORE = -100


def decode_like_original(text: str) -> str:
    """The original's `minigpt_base.generate` post-processing of the decoded text (used by the
    `original` evaluation protocol, tinygpt_v.evaluation.original)."""
    return text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip()


def splice_images(embeds: torch.Tensor, slots: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Write each sample's image embeddings into its image slots, every sample in one indexed
    copy (no per-sample loop, no host sync). A capped prompt may have cut part of an image:
    row i takes its first `slots[i].sum()` image tokens."""
    fits = torch.arange(image_embeds.shape[1], device=slots.device) < slots.sum(1, keepdim=True)
    embeds[slots] = image_embeds[fits].to(embeds.dtype)
    return embeds


@dataclass
class TokenSequence:
    """One sample as token ids; image positions hold a placeholder id and are flagged.
    `mask` is the attention mask of each position (0 only for a conversation's later BOS)."""
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    is_image: list[bool] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    prompt_truncated: bool = False

    def add_text(self, ids: list[int], is_target: bool = False, mask: list[int] | None = None) -> None:
        self.ids += ids
        self.labels += ids if is_target else [IGNORE] * len(ids)
        self.is_image += [False] * len(ids)
        self.mask += mask if mask is not None else [1] * len(ids)

    def add_image(self, num_tokens: int, placeholder: int) -> None:
        self.ids += [placeholder] * num_tokens
        self.labels += [IGNORE] * num_tokens
        self.is_image += [True] * num_tokens
        self.mask += [1] * num_tokens

    def extend(self, other: "TokenSequence") -> None:
        self.ids += other.ids
        self.labels += other.labels
        self.is_image += other.is_image
        self.mask += other.mask

    def truncate(self, length: int) -> None:
        del self.ids[length:], self.labels[length:], self.is_image[length:], self.mask[length:]


class TinyGPTV(nn.Module):
    def __init__(self, vision: nn.Module | None, qformer: nn.Module | None, connector: nn.Module,
                 llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, prompt_template: str = "{}",
                 end_sym: str = "\n", max_txt_len: int = 32, max_context_len: int = 3800):
        super().__init__()
        self.vision = vision
        self.ln_vision = nn.LayerNorm(vision.num_features) if vision is not None else None
        self.qformer = qformer
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.end_sym = end_sym
        self.max_txt_len = max_txt_len
        self.max_context_len = max_context_len
        self.frozen_parts: tuple[str, ...] = ()
        self.num_truncated_prompts = 0  # prompts cut at max_context_len so far (see _note_truncated)
        self._vision_token_counts: dict[tuple, int] = {}  # image size -> vision tokens (no Q-Former)

    # --- images ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def vision_device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_image_tokens, llm hidden), in the LLM's dtype."""
        return self.project_features(self.image_features(pixels))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the frozen towers make of an image, before the connector: the Q-Former's
        outputs, or the vision tokens after ln_vision without a Q-Former. A pure function of
        the pixels while the towers are frozen, so it can be cached (training.feature_cache)."""
        # the vision tower may live elsewhere (e.g. on the CPU to save GPU memory), and so may
        # ln_vision + Q-Former (moved off the GPU while a feature cache serves every image)
        tower_device = self.ln_vision.weight.device
        tokens = self.vision(pixels.to(self.vision_device)).to(tower_device)
        tokens = self.ln_vision(tokens.float())
        if self.qformer is not None:
            tokens = self.qformer(tokens)
        return tokens.to(self.device)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """`image_features` -> the LLM's image embeddings (the connector, trainable)."""
        return self.connector(features.to(self.device)).to(self.llm_dtype)

    # --- text -> token sequences -------------------------------------------------------------

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prompt_part(self, prompt: str, num_image_tokens: int) -> TokenSequence:
        """The conditioning part: text around `<ImageHere>` (no special tokens) + image slots."""
        seq = TokenSequence()
        before, marker, after = prompt.partition(IMAGE_MARKER)
        seq.add_text(self._tokens(before))
        if marker:
            seq.add_image(num_image_tokens, self.tokenizer.pad_token_id)
            seq.add_text(self._tokens(after))
        return seq

    def _regressed_part(self, prompts: list[str], answers: list[str], add_end_sym: bool) -> TokenSequence:
        """What follows the first prompt, as the original's `preparing_embedding` builds it.

        One turn: answer + end_sym, ids equal to the pad id are no target (its tokenizer call
        with `masked_fill(ids == pad, -100)`). Several turns (`tokenize_conversation`):
        answer_1 end_sym [BOS] prompt_2 answer_2 end_sym ..., attention mask `ids != pad`, so
        each later BOS is masked out as well (Phi-2: pad = BOS)."""
        end = self.end_sym if add_end_sym else ""
        pad = self.tokenizer.pad_token_id
        seq = TokenSequence()
        if len(prompts) == 1:
            ids = self._tokens(answers[0] + end)
            seq.add_text(ids, is_target=True)
            seq.labels = [IGNORE if t == pad else t for t in ids]
            return seq
        for turn, answer in enumerate(answers):
            if turn > 0:
                question = [self.tokenizer.bos_token_id] + self._tokens(prompts[turn])
                seq.add_text(question, mask=[int(t != pad) for t in question])
            ids = self._tokens(answer + end)
            seq.add_text(ids, is_target=True, mask=[int(t != pad) for t in ids])
        return seq

    def build_sequence(self, prompts: list[str], answers: list[str] | None, num_image_tokens: int,
                       apply_template: bool = True, add_end_sym: bool = True, add_bos: bool = True) -> TokenSequence:
        """Token sequence of one sample. `answers=None` gives a generation prompt.

        `add_bos=False` leaves out the leading BOS: the original's `generate` has none (its
        `get_context_emb` asks Phi-2's tokenizer for special tokens, which adds no BOS); its
        training `forward` always has one.

        Training: [BOS] + prompt part capped at `max_context_len` (the original's prompt_wrap)
        + regressed part capped at `max_txt_len` (its tokenizer truncation), so the answer
        always survives a long prompt. A generation prompt is not cut (the original's
        `generate` does not cut it either; callers keep conversations short)."""
        if apply_template:
            prompts = [self.prompt_template.format(p) for p in prompts]
        seq = TokenSequence()
        seq.add_text([self.tokenizer.bos_token_id] if add_bos else [])
        first = self._prompt_part(prompts[0], num_image_tokens)
        if answers is None:
            if len(prompts) != 1:
                raise ValueError("a generation prompt is one string (a conversation is written into it)")
            seq.extend(first)
            return seq
        if len(first.ids) > self.max_context_len:
            first.truncate(self.max_context_len)
            seq.prompt_truncated = True
        seq.extend(first)
        regressed = self._regressed_part(prompts, answers, add_end_sym)
        regressed.truncate(self.max_txt_len)
        seq.extend(regressed)
        return seq

    @staticmethod
    def check_markers(prompts: list[list[str]], has_images: bool) -> None:
        """Exactly one `<ImageHere>` per sample with an image, none without."""
        expected = 1 if has_images else 0
        for i, turns in enumerate(prompts):
            found = sum(p.count(IMAGE_MARKER) for p in turns)
            if found != expected:
                raise ValueError(f"sample {i}: prompt has {found} '{IMAGE_MARKER}' markers, expected "
                                 f"{expected} ({'with' if has_images else 'without'} an image): {turns!r}")

    # --- batches -----------------------------------------------------------------------------

    def pad_batch(self, seqs: list[TokenSequence], left_pad: bool = False):
        """(ids, labels, attention mask, image slots), each (B, L), padded with the pad id /
        IGNORE / 0 / False on the right (training) or the left (generation)."""
        length = max(len(s.ids) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        slots = torch.zeros((len(seqs), length), dtype=torch.bool)
        for i, s in enumerate(seqs):
            span = slice(length - len(s.ids), length) if left_pad else slice(0, len(s.ids))
            ids[i, span], labels[i, span] = torch.tensor(s.ids), torch.tensor(s.labels)
            mask[i, span], slots[i, span] = torch.tensor(s.mask), torch.tensor(s.is_image, dtype=torch.bool)
        return ids, labels, mask, slots

    def _embed(self, seqs: list[TokenSequence], images: torch.Tensor | None, left_pad: bool):
        """Pad sequences, embed tokens, and write image embeddings into their slots."""
        return self._embed_padded(self.pad_batch(seqs, left_pad), images)

    def _embed_padded(self, padded: tuple, images: torch.Tensor | None, features: torch.Tensor | None = None):
        """(ids, labels, mask, slots) from `pad_batch` -> (embeds, mask, labels) on the device;
        the image embeddings come from `images` (pixels) or from cached `features`."""
        ids, labels, mask, slots = (t.to(self.device, non_blocking=True) for t in padded)
        embeds = self.llm.get_input_embeddings()(ids)
        if features is not None or images is not None:
            image_embeds = self.project_features(features) if features is not None else self.encode_image(images)
            embeds = splice_images(embeds, slots, image_embeds)
        return embeds, mask, labels

    def num_image_tokens(self, images: torch.Tensor | None, features: torch.Tensor | None = None) -> int:
        if images is None and features is None:
            return 0
        if self.qformer is not None:  # (DeepSpeed ZeRO-3 partitions it: its shape is then ds_shape)
            return getattr(self.qformer.query_tokens, "ds_shape", self.qformer.query_tokens.shape)[1]
        if features is not None:
            num_tokens = features.shape[1]
        else:
            size = tuple(images.shape[-2:])
            if size not in self._vision_token_counts:  # one image through the tower, once per size
                with torch.no_grad():
                    self._vision_token_counts[size] = self.vision(images[:1].to(self.vision_device)).shape[1]
            num_tokens = self._vision_token_counts[size]
        # a connector may merge tokens (pixel_shuffle): the LLM sees its output count
        return self.connector.num_output_tokens(num_tokens) if hasattr(self.connector, "num_output_tokens") \
            else num_tokens

    def training_tokens(self, images, prompts, answers, add_end_sym=True, apply_template=True,
                        features=None) -> dict:
        """The token side of a training batch, on the CPU: `input_ids`, `labels`,
        `attention_mask`, `image_slots` (B, L) and how many prompts were capped. The loader may
        call this ahead of the step (`pretokenize`); `forward` then skips the tokenizer."""
        self.check_markers(prompts, images is not None or features is not None)
        n_image = self.num_image_tokens(images, features)
        seqs = [self.build_sequence(p, a, n_image, apply_template=apply_template, add_end_sym=add_end_sym)
                for p, a in zip(prompts, answers)]
        ids, labels, mask, slots = self.pad_batch(seqs)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_slots": slots,
                "num_truncated": sum(s.prompt_truncated for s in seqs)}

    def pretokenize(self, batch: dict) -> dict:
        """A collated batch + its `training_tokens` (the loader's `prepare` hook)."""
        return {**batch, **self.training_tokens(batch.get("image"), batch["prompt"], batch["answer"])}

    def prepare_training_inputs(self, images, prompts, answers, add_end_sym=True, apply_template=True):
        tokens = self.training_tokens(images, prompts, answers, add_end_sym, apply_template)
        return self._embed_tokens(tokens, images)

    def _embed_tokens(self, tokens: dict, images, features=None):
        self._note_truncated(int(tokens["num_truncated"]))
        padded = (tokens["input_ids"], tokens["labels"], tokens["attention_mask"], tokens["image_slots"])
        return self._embed_padded(padded, images, features)

    def _note_truncated(self, count: int) -> None:
        """Prompts cut at max_context_len (their answers kept): counted and logged, never silent."""
        if not count:
            return
        before = self.num_truncated_prompts
        self.num_truncated_prompts += count
        if before < 5 or before // 1000 != self.num_truncated_prompts // 1000:
            log.warning("%d prompt(s) longer than max_context_len=%d were cut to it, keeping their answers "
                        "(%d so far)", count, self.max_context_len, self.num_truncated_prompts)

    def forward(self, batch: dict) -> dict:
        """Batch from the data collate: `image` (B,3,S,S) or None, `prompt` and `answer` as
        lists of per-turn strings. Returns the mean loss over answer + end_sym tokens.

        Two shortcuts, same result: a batch already holding `training_tokens` (`input_ids`, ...:
        the loader's `pretokenize`) is not tokenised again, and one holding `image_features`
        (training.feature_cache) skips the frozen towers."""
        features = batch.get("image_features")
        if "input_ids" not in batch:
            batch = {**batch, **self.training_tokens(batch.get("image"), batch["prompt"], batch["answer"],
                                                     features=features)}
        host_labels, host_mask = batch["labels"], batch["attention_mask"]
        embeds, mask, labels = self._embed_tokens(batch, batch.get("image"), features)
        predicts_target = labels[:, 1:] != IGNORE  # position t predicts token t+1
        logits = self.target_logits(embeds, mask, predicts_target)
        targets = labels[:, 1:][predicts_target]
        loss_sum = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        # counted on the host copies (when the batch came pre-tokenised): no device sync
        num_targets = int((host_labels[:, 1:] != IGNORE).sum())
        return {"loss": loss_sum / max(num_targets, 1), "num_target_tokens": num_targets,
                "num_tokens": int(host_mask.sum())}

    def target_logits(self, embeds: torch.Tensor, mask: torch.Tensor, predicts_target: torch.Tensor):
        """Logits only where a target is predicted. The LM head over a 51k vocabulary is the
        largest activation of a step; prompt and image positions never need it."""
        causal_lm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        # use_cache=False: a training forward needs no KV cache (the config's default builds one)
        hidden = causal_lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return causal_lm.get_output_embeddings()(hidden[:, :-1][predicts_target])

    @torch.no_grad()
    def score_candidates(self, images: torch.Tensor | None, prompts: list[str], candidates: list[list[str]],
                         apply_template: bool = True, suffix: str = "", mean: bool = False) -> list[list[float]]:
        """Log-likelihood of each candidate answer after its prompt, for multiple choice (IconQA).

        Default: the sum over the candidate's tokens, our template, no end_sym. The original's
        `multi_select` ranks by its training loss instead: the mean over candidate + "\n" (its
        eval model's end_sym) with the prompt as given, i.e. `apply_template=False, suffix="\n",
        mean=True` (tinygpt_v.evaluation.original.ORIGINAL_SCORING)."""
        flat_prompts = [[p] for p, cands in zip(prompts, candidates) for _ in cands]
        flat_answers = [[c + suffix] for cands in candidates for c in cands]
        owner = [i for i, cands in enumerate(candidates) for _ in cands]
        flat_images = images[owner] if images is not None else None
        embeds, mask, labels = self.prepare_training_inputs(flat_images, flat_prompts, flat_answers, add_end_sym=False,
                                                            apply_template=apply_template)
        logprobs = self.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        targets = labels[:, 1:]
        is_target = targets != IGNORE
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * is_target).sum(-1)
        scores = (sums / is_target.sum(-1).clamp(min=1) if mean else sums).tolist()
        out, k = [], 0
        for cands in candidates:
            out.append(scores[k:k + len(cands)])
            k += len(cands)
        return out

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None, prompts: list[str], max_new_tokens: int = 20,
                 do_sample: bool = False, num_beams: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, apply_template: bool = True, streamer=None,
                 static_cache: bool | None = None, compile: bool | None = None, stop_at_end_sym: bool = True,
                 min_new_tokens: int = 0, add_bos: bool = True) -> list[str]:
        """Answer each prompt; stops at end_sym or EOS; returns the decoded strings.

        `static_cache` preallocates the KV cache (fixed shapes), which `compile` needs to turn
        the decode step into one compiled graph (CUDA graphs on GPU); neither changes results.
        `stop_at_end_sym=False` generates as the original's `generate` (its stopping criteria are
        commented out): on to EOS or max_new_tokens, the text decoded as it does
        (`decode_like_original`), not cut at end_sym.
        `static_cache` / `compile` left at None take `self.decode_options` (set from the
        evaluation / inference settings' keys of the same names; both off by default).
        `min_new_tokens` bars EOS before that many tokens (the original's min_length=1).
        `add_bos=False` starts the prompt without BOS, as the original's `generate` does."""
        options = getattr(self, "decode_options", {})
        static_cache = options.get("static_cache", False) if static_cache is None else static_cache
        compile = options.get("compile", False) if compile is None else compile
        self.check_markers([[p] for p in prompts], images is not None)
        n_image = self.num_image_tokens(images)
        seqs = [self.build_sequence([p], None, n_image, apply_template=apply_template, add_bos=add_bos)
                for p in prompts]
        embeds, mask, _ = self._embed(seqs, images, left_pad=True)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        out = self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            num_beams=num_beams, repetition_penalty=repetition_penalty, streamer=streamer,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=[self.end_sym] if self.end_sym and stop_at_end_sym else None, tokenizer=self.tokenizer,
            cache_implementation="static" if static_cache else None, disable_compile=not compile,
            min_new_tokens=min_new_tokens or None, **sampling)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        if not stop_at_end_sym:
            return [decode_like_original(text) for text in texts]
        return [self.clean_answer(text) for text in texts]

    def clean_answer(self, text: str) -> str:
        """Cut at end_sym (and the original's `Assistant:` echo), strip whitespace."""
        if self.end_sym:
            text = text.split(self.end_sym)[0]
        text = text.split("Assistant:")[-1]
        return text.strip()

    # --- frozen parts stay in eval mode -------------------------------------------------------

    def train(self, mode: bool = True) -> "TinyGPTV":
        super().train(mode)
        for name in self.frozen_parts:  # no dropout / batch-stat updates in parts that never train
            if getattr(self, name) is not None:
                getattr(self, name).eval()
        return self

    # --- self-contained export (tinygpt_v.checkpoints.export) ---------------------------------

    @classmethod
    def from_pretrained(cls, folder, verbose: bool = False) -> "TinyGPTV":
        """Rebuild a model written by `save_pretrained`: config.yaml + model.safetensors + tokenizer."""
        from ..checkpoints import from_pretrained
        return from_pretrained(folder, verbose=verbose)

    def chat(self, image, question: str, **kwargs) -> str:
        """One question about one image (path, PIL image or tensor); see tinygpt_v.inference.Chat."""
        from ..inference import chat
        return chat(self, image, question, **kwargs)

    def save_pretrained(self, folder, model_config=None) -> None:
        """Export to `folder`; `model_config` defaults to the section the model was built from."""
        from ..checkpoints import save_pretrained
        save_pretrained(self, folder, model_config)
