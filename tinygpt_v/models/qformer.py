"""The BLIP-2 Q-Former (transformers' Blip2QFormerModel) with its learned query tokens."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..registry import QFORMERS, PathOrHubId, supplied_by_code


class QFormer(nn.Module):
    """32 learned queries cross-attend to the image tokens and come out as (B, 32, hidden)."""

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int):
        super().__init__()
        self.bert = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.num_features = config.hidden_size

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        # every image token is real, so no encoder mask (None = attend to all)
        return self.bert(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state


@QFORMERS.register("blip2_qformer")
@supplied_by_code("encoder_width")
def blip2_qformer(encoder_width: int, num_query_tokens: int = 32, hidden_size: int = 768,
                  num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072,
                  cross_attention_frequency: int = 2, initializer_range: float = 0.02,
                  pretrained: PathOrHubId | None = None) -> QFormer:
    """BLIP-2's Q-Former. The text branch (word embeddings, text FFN, LM head) is not built:
    TinyGPT-V only ever feeds queries, and the original deletes those weights too.
    `initializer_range` (BERT's 0.02) matters only without pretrained weights: at that scale a
    random Q-Former passes little of the image through, so toy-sized runs may want more."""
    config = Blip2QFormerConfig(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_width, use_qformer_text_input=False, initializer_range=initializer_range,
    )
    qformer = QFormer(config, num_query_tokens)
    if pretrained is not None:
        from ..checkpoints import load_blip2_qformer
        load_blip2_qformer(qformer, pretrained)
    return qformer
