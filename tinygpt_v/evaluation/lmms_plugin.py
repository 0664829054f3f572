"""lmms-eval model plugin: run any lmms-eval task on a TinyGPT-V model.

    pip install 'tinygpt_v[lmms]'
    lmms-eval --model tinygpt_v --model_args pretrained=exported_folder --batch_size 8 --tasks gqa
    lmms-eval --model tinygpt_v --model_args pretrained=ckpt.pth,config=train_configs/stage4.yaml ...

lmms-eval finds the model through the `lmms_eval.models` entry point, which names `manifest` below.
`pretrained` is what `evaluation.checkpoint` accepts; `config`, a YAML with the `model:` section,
is needed unless `pretrained` is an exported folder (which carries its own config). lmms-eval is
an optional dependency: only lmms-eval imports this module, never `tinygpt_v.evaluation` itself.

Importing this module imports nothing of lmms-eval: lmms-eval's model registry loads the entry
points while it is itself being imported, so a top-level `from lmms_eval...` here, run first,
would start that registry half-built and lmms-eval would then report "Model 'tinygpt_v' not found".
The class is made on first access (`TinyGPTV`, a module attribute, PEP 562).

`model_args` other than those of `TinyGPTV.__init__` are refused with a message naming them.
Known limitation upstream: lmms-eval 0.7.3's own multiple-choice (loglikelihood) path is
broken; run multiple-choice benchmarks through `eval.py` (which ranks the options itself).
"""
from __future__ import annotations

import json
import warnings

import torch
from tqdm import tqdm

from .benchmark import IMAGE_PROMPT, IMAGE_SLOT
from .images import image_transform
from .loading import model_image_size
from .runner import device_of, process_state

MODEL_ID = "tinygpt_v"
LMMS_IMAGE_TOKEN = "<image>"
MODEL_ARGS = ("pretrained", "config", "batch_size", "max_new_tokens", "image_size", "precision", "device")
# lmms-eval passes these to every model itself (from its own command line): accepted, not used
LMMS_PASSED = ("max_batch_size",)


def manifest():
    """The entry point's payload: where lmms-eval finds the class."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TinyGPTV")


def check_model_args(given) -> None:
    """Refuse model_args this model does not take (a typo would otherwise do nothing)."""
    unknown = sorted(set(given) - set(LMMS_PASSED))
    if unknown:
        raise ValueError(f"tinygpt_v: unknown model_args {', '.join(unknown)}; accepted: {', '.join(MODEL_ARGS)}")


def __getattr__(name: str):
    if name == "TinyGPTV":
        cls = _model_class()
        globals()["TinyGPTV"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _model_class():
    from lmms_eval.api.model import lmms
    return type("TinyGPTV", (_TinyGPTVMethods, lmms), {"__module__": __name__, "__qualname__": "TinyGPTV"})


class _TinyGPTVMethods:
    """The lmms-eval model; subclassed with lmms-eval's `lmms` base on first access of `TinyGPTV`."""
    is_simple = True

    def __init__(self, pretrained: str | None = None, config: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 20, image_size: int | None = None, precision: str = "auto",
                 device: str | None = None, model=None, **unused) -> None:
        check_model_args(unused)
        super().__init__()
        state = process_state()
        self._rank, self._world_size = state.process_index, state.num_processes
        device = torch.device(device) if device and state.num_processes == 1 else state.device
        self.model = model if model is not None else _load(pretrained, config, precision, device)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.transform = image_transform(int(image_size) if image_size else model_image_size(self.model))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def generate_until(self, requests) -> list[str]:
        inputs = [(r.args[0], self._visuals(r.args[2], r.args[4], r.args[5], r.args[3])) for r in requests]
        # Batch requests that share generation settings and whether they have an image.
        groups: dict[str, list[int]] = {}
        for i, (request, (_, visuals)) in enumerate(zip(requests, inputs)):
            groups.setdefault(json.dumps([request.args[1], bool(visuals)], sort_keys=True, default=str), []).append(i)
        replies: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tinygpt_v")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                gen_kwargs = requests[chunk[0]].args[1]
                for i, reply in zip(chunk, self._generate([inputs[i] for i in chunk], gen_kwargs)):
                    replies[i] = reply
                progress.update(len(chunk))
        progress.close()
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        # The model scores a continuation but does not say whether greedy decoding would produce
        # it, so is_greedy is always False (metrics built on log-probabilities are unaffected).
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="tinygpt_v loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            # lmms-eval starts continuations with the target delimiter (" red"); our model's answer
            # follows its chat template, where the answer is scored without that space.
            continuation = continuation.lstrip()
            images, prompts = self._inputs([(context, self._visuals(doc_to_visual, task, split, doc_id))])
            score = self.model.score_candidates(images, prompts, [[continuation]])[0][0]
            results.append((float(score), False))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tinygpt_v answers single-turn requests only")

    # --- helpers ---
    def _generate(self, pairs: list[tuple[str, list]], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        images, prompts = self._inputs(pairs)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        with torch.inference_mode():
            replies = self.model.generate(
                images, prompts, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                do_sample=temperature > 0, temperature=temperature or 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0),
                num_beams=int(gen_kwargs.get("num_beams", 1)))
        return [_cut(reply, until) for reply in replies]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [v for v in (visuals or []) if v is not None]

    def _inputs(self, pairs) -> tuple[torch.Tensor | None, list[str]]:
        """(images, prompts) for (context, visuals) pairs: one image per prompt, spliced where the
        task put `<image>`, else before the text."""
        prompts, images = [], []
        for context, visuals in pairs:
            if len(visuals) > 1:
                warnings.warn("tinygpt_v takes one image per prompt; using the first")
            if visuals:
                images.append(self.transform(visuals[0].convert("RGB")))
                if LMMS_IMAGE_TOKEN in context:  # the image goes where the first <image> is; extra ones dropped
                    before, after = context.split(LMMS_IMAGE_TOKEN, 1)
                    context = before + IMAGE_SLOT + after.replace(LMMS_IMAGE_TOKEN, "")
                else:
                    context = IMAGE_PROMPT.format(context)
            prompts.append(context)
        if not images:
            return None, prompts
        return torch.stack(images).to(device_of(self.model)), prompts


def _cut(reply: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            reply = reply.split(stop)[0]
    return reply.strip()


def _load(pretrained: str | None, config: str | None, precision: str, device: torch.device):
    """`pretrained` as evaluation.checkpoint takes it; `config` is needed unless it is an export folder."""
    from omegaconf import OmegaConf

    from ..config import load_config, resolve_config_path
    from .loading import load_model  # refuses a `config` whose model section the checkpoint was not trained as
    from .settings import EvalSettings
    cfg = load_config(resolve_config_path(config)) if config else OmegaConf.create({})
    return load_model(cfg, EvalSettings(benchmarks={}, checkpoint=pretrained, precision=precision), device)
