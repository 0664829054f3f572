"""Vision encoders: EVA ViT-g (BLIP-2's) on timm's Eva, or any timm model by name.

A vision encoder is an nn.Module whose forward maps pixels (B, 3, S, S) to patch tokens
(B, N, width) and which exposes `num_features` (the width). The original runs EVA in fp16;
`precision` chooses the dtype of its weights, while the rest of the model stays fp32.
"""
from __future__ import annotations

from typing import Literal

import timm
import torch
from torch import nn

from ..registry import VISION_ENCODERS, PathOrHubId

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TimmVisionEncoder(nn.Module):
    """Wraps a timm model so every encoder answers `forward(pixels) -> tokens` the same way."""

    def __init__(self, model: nn.Module, precision: Precision):
        super().__init__()
        self.model = model.to(DTYPES[precision])
        self.num_features = model.num_features
        self.image_size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels.to(self.dtype))

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
               grad_checkpointing: bool = False, **timm_kwargs) -> TimmVisionEncoder:
    """Any timm model by name; its `forward_features` tokens feed the Q-Former.

    `pretrained: true` lets timm fetch its own weights (online only); `checkpoint_path` loads
    a local file instead. Extra keys are passed to `timm.create_model`.
    """
    model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, global_pool="",
                              img_size=image_size, checkpoint_path=checkpoint_path or "", **timm_kwargs)
    encoder = TimmVisionEncoder(model, precision)
    encoder.set_grad_checkpointing(grad_checkpointing)
    return encoder
