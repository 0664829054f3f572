"""Vision encoders: EVA ViT-g (BLIP-2's) on timm's Eva, or any timm model by name.

A vision encoder is an nn.Module whose forward maps pixels (B, 3, S, S) to patch tokens
(B, N, width) and which exposes `num_features` (the width).

Precision, as the original runs its frozen EVA: `precision: fp16` converts the weights of the
Linear and Conv layers only to fp16 (LAVIS `convert_weights_to_fp16`: that is nearly all of the
memory), and the forward runs under autocast. LayerNorms, the position embedding, the class
token and EVA's q/v biases stay fp32, and so does the residual stream (fp16 matmul outputs are
added to an fp32 stream), where casting the whole tower would carry it in fp16 through 39 blocks.
"""
from __future__ import annotations

from typing import Literal

import timm
import torch
from torch import nn

from ..registry import VISION_ENCODERS, PathOrHubId

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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

    def __init__(self, model: nn.Module, precision: Precision):
        super().__init__()
        self.model = model
        self.num_features = model.num_features
        self.image_size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else None
        self.set_precision(precision)

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
        if self.compute_dtype == torch.float32 or device.type == "meta":
            # no autocast (the meta device, shapes only, has none): pixels go in at the dtype of the
            # first matmul layer, which is also right for a tower cast as a whole with .to(dtype)
            return self.model.forward_features(pixels.to(device=device, dtype=self._first_matmul_dtype()))
        with torch.autocast(device.type, dtype=self.compute_dtype):
            return self.model.forward_features(pixels.to(device=device, dtype=torch.float32))

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
