"""Vision encoders: EVA ViT-g (BLIP-2's) on timm's Eva, or any timm model by name.

A vision encoder is an nn.Module whose forward maps pixels (B, 3, S, S) to patch tokens
(B, N, width) and which exposes `num_features` (the width).

Precision, as the original runs its frozen EVA: `precision: fp16` converts the weights of the
Linear and Conv layers only to fp16 (LAVIS `convert_weights_to_fp16`: that is nearly all of the
memory), and the forward runs under autocast. LayerNorms, the position embedding, the class
token and EVA's q/v biases stay fp32, and so does the residual stream (fp16 matmul outputs are
added to an fp32 stream), where casting the whole tower would carry it in fp16 through 39 blocks.

Pixel normalisation: every image processor of the project (training data, evaluation,
inference, the toy evaluation) normalises with CLIP's mean / std, BLIP-2's. An encoder trained
with other statistics (SigLIP / SigLIP 2: 0.5, 0.5) says so with its `mean` / `std` (timm's
pretrained config by default) and converts the incoming pixels to them first, an exact
per-channel affine map. So the encoder chooses its normalisation in one place, and training and
evaluation can never disagree about it. `input_mean` / `input_std` name the processors'
statistics if a config changes them.
"""
from __future__ import annotations

from typing import Literal

import timm
import torch
from torch import nn

from ..registry import VISION_ENCODERS, ConfigError, PathOrHubId

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# BLIP-2 / EVA-CLIP / OpenAI CLIP pixel normalisation (LAVIS' constants).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The layers whose weights a reduced precision converts (LAVIS convert_weights_to_fp16).
LOW_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def convert_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Linear / Conv weights and biases to `dtype`; every other parameter and buffer unchanged."""
    for module in model.modules():
        if isinstance(module, LOW_PRECISION_LAYERS):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


class TimmVisionEncoder(nn.Module):
    """Wraps a timm model so every encoder answers `forward(pixels) -> tokens` the same way."""

    def __init__(self, model: nn.Module, precision: Precision, keep_cls: bool = True,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 input_mean: tuple[float, ...] = CLIP_MEAN, input_std: tuple[float, ...] = CLIP_STD):
        super().__init__()
        self.model = model
        self.num_features = model.num_features
        self.image_size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else None
        # class / register tokens before the patch tokens (timm's num_prefix_tokens); dropped
        # from the output unless keep_cls
        self.num_dropped_tokens = 0 if keep_cls else getattr(model, "num_prefix_tokens", 0)
        self.mean, self.std = tuple(mean), tuple(std)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.set_precision(precision)

    def renormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels normalised with (input_mean, input_std) -> normalised with the encoder's own."""
        if (self.mean, self.std) == (self.input_mean, self.input_std):
            return pixels
        def per_channel(values):
            return torch.tensor(values, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        raw = pixels.float() * per_channel(self.input_std) + per_channel(self.input_mean)
        return (raw - per_channel(self.mean)) / per_channel(self.std)

    def set_precision(self, precision: Precision | torch.dtype) -> "TimmVisionEncoder":
        """fp32: everything fp32. fp16 / bf16: Linear and Conv weights in that dtype, the rest fp32,
        the forward under autocast (see the module docstring)."""
        self.compute_dtype = precision if isinstance(precision, torch.dtype) else DTYPES[precision]
        self.model.float()
        if self.compute_dtype != torch.float32:
            convert_matmul_weights(self.model, self.compute_dtype)
        return self

    def _first_matmul_dtype(self) -> torch.dtype:
        return next((m.weight.dtype for m in self.model.modules() if isinstance(m, LOW_PRECISION_LAYERS)),
                    torch.float32)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        pixels = self.renormalize(pixels.to(device))
        if self.compute_dtype == torch.float32 or device.type == "meta":
            # no autocast (the meta device, shapes only, has none): pixels go in at the dtype of the
            # first matmul layer, which is also right for a tower cast as a whole with .to(dtype)
            tokens = self.model.forward_features(pixels.to(device=device, dtype=self._first_matmul_dtype()))
        else:
            with torch.autocast(device.type, dtype=self.compute_dtype):
                tokens = self.model.forward_features(pixels.to(device=device, dtype=torch.float32))
        return tokens[:, self.num_dropped_tokens:]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_grad_checkpointing(enabled)


@VISION_ENCODERS.register("eva_vit_g")
def eva_vit_g(image_size: int = 224, width: int = 1408, depth: int = 39, heads: int = 16,
              mlp_dim: int = 6144, patch_size: int = 14, precision: Precision = "fp16",
              pretrained: PathOrHubId | None = None, grad_checkpointing: bool = False) -> TimmVisionEncoder:
    """EVA ViT-g/14 as BLIP-2 uses it: the last of EVA-CLIP's 40 blocks dropped, no final norm.

    timm's Eva with `qkv_bias=True` keeps separate q/v biases (k has none), as LAVIS's EVA does,
    so LAVIS `eva_vit_g.pth` keys map one to one. Building at `image_size` 448 gives a 32x32
    position grid; the loader interpolates the checkpoint's 16x16 grid to it.
    """
    model = timm.models.eva.Eva(
        img_size=image_size, patch_size=patch_size, num_classes=0, global_pool="",
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_dim / width,
        qkv_bias=True, qkv_fused=True, use_abs_pos_emb=True, use_rot_pos_emb=False,
        use_post_transformer_norm=False, use_fc_norm=False, init_values=None,
    )
    if pretrained is not None:
        from ..checkpoints import load_eva_vit_g
        load_eva_vit_g(model, pretrained)
    encoder = TimmVisionEncoder(model, precision)
    encoder.set_grad_checkpointing(grad_checkpointing)
    return encoder


@VISION_ENCODERS.register("timm")
def timm_model(model_name: str, image_size: int = 224, precision: Precision = "fp32",
               pretrained: bool = False, checkpoint_path: PathOrHubId | None = None,
               grad_checkpointing: bool = False, feature_layer: int | None = None, keep_cls: bool = True,
               mean: list[float] | None = None, std: list[float] | None = None,
               input_mean: list[float] = CLIP_MEAN, input_std: list[float] = CLIP_STD,
               **timm_kwargs) -> TimmVisionEncoder:
    """Any timm model by name (SigLIP / SigLIP 2: `vit_base_patch16_siglip_224.v2_webli`, CLIP:
    `vit_base_patch16_clip_224.openai`, ...); its tokens feed the Q-Former or the connector.

    `pretrained: true` lets timm fetch its own weights (its hub id is the model name's, e.g.
    timm/vit_base_patch16_siglip_224.v2_webli); `checkpoint_path` loads a local file instead.
    `feature_layer`: null takes `forward_features` (all blocks and the final norm); an index
    takes that block's output, no final norm, as LLaVA's `mm_vision_select_layer` (-2: the
    penultimate block); the later blocks are removed. `keep_cls: false` drops the class (and
    register) tokens, keeping the patch grid. `mean` / `std`: the statistics the encoder was
    trained with, by default timm's pretrained config of the model (see the module docstring).
    Extra keys go to `timm.create_model` (e.g. embed_dim, depth, num_heads for a small random
    twin)."""
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, global_pool="",
                                  img_size=image_size, checkpoint_path=checkpoint_path or "", **timm_kwargs)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise ConfigError("model.vision.model_name", str(e)) from None
    if feature_layer is not None:
        _keep_blocks_up_to(model, feature_layer)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    encoder = TimmVisionEncoder(model, precision, keep_cls=keep_cls, mean=mean or cfg.get("mean", CLIP_MEAN),
                                std=std or cfg.get("std", CLIP_STD), input_mean=input_mean, input_std=input_std)
    encoder.set_grad_checkpointing(grad_checkpointing)
    return encoder


def _keep_blocks_up_to(model: nn.Module, feature_layer: int) -> None:
    """Remove the blocks after `feature_layer` and the final norm (timm's own pruning)."""
    depth = len(getattr(model, "blocks", ()))
    if not hasattr(model, "prune_intermediate_layers") or not depth:
        raise ConfigError("model.vision.feature_layer", f"{type(model).__name__} has no block list to choose from")
    if not -depth <= feature_layer < depth:
        raise ConfigError("model.vision.feature_layer", f"{feature_layer} is out of range for {depth} blocks")
    model.prune_intermediate_layers([feature_layer % depth], prune_norm=True, prune_head=True)
