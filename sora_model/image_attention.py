"""Image features as extra cross-attention tokens (Wan2.1 I2V and FLF2V), beside the caption's.

An image encoder's features (CLIP ViT-H/14's penultimate layer for Wan) go through `ImageEmbedder` once per forward
pass (LayerNorm, GELU MLP to the model width, LayerNorm; for two images first a learned position embedding over
both images' tokens). Each block's `ImageTextCrossAttention` then attends from the same queries to the caption
and, with its own key/value projection and key RMSNorm, to the image tokens, and sums the two before the output
projection: diffusers' `WanAttnProcessor` with `added_kv_proj_dim`. The context a block receives is the image
tokens first, then the caption's, as Wan concatenates them; `image_tokens` says where the caption starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, TokenLayout, _norm_heads, qk_norms
from .precision import FP32LayerNorm, weight_dtype

IMAGE_NORM_EPS = 1e-5
"""The image embedder's LayerNorms use torch's default eps (diffusers' `WanImageEmbedding`), not the blocks' 1e-6."""


class ImageEmbedder(nn.Module):
    """(clips, images * tokens, image_dim) encoder features -> (clips, images * tokens, D) context tokens."""

    def __init__(self, image_dim: int, hidden_size: int, position_tokens: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim, eps=IMAGE_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, hidden_size))
        self.norm2 = FP32LayerNorm(hidden_size, eps=IMAGE_NORM_EPS)
        # FLF2V: which of the two images (and which of its tokens) a feature came from.
        self.pos_embed = nn.Parameter(torch.zeros(1, position_tokens, image_dim)) if position_tokens else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            if features.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(
                    f"image features have {features.shape[1]} tokens per clip, the position embedding "
                    f"{self.pos_embed.shape[1]}"
                )
            features = features + self.pos_embed.to(features.dtype)  # (clips, 2 Ti, Di)
        x = self.mlp(self.norm1(features).to(weight_dtype(self.mlp[0])))  # (clips, Li, D)
        return self.norm2(x)  # (clips, Li, D) fp32


class ImageTextCrossAttention(CrossAttention):
    """Cross-attention to a caption plus image tokens: context (clips, image_tokens + L, D), images first."""

    def __init__(self, dim: int, num_heads: int, image_tokens: int, qk_norm: bool = True, qk_norm_over: str = "head"):
        super().__init__(dim, num_heads, qk_norm, qk_norm_over)
        self.image_tokens = image_tokens
        self.kv_image = nn.Linear(dim, 2 * dim)
        self.k_image_norm = qk_norms(dim, self.head_dim, qk_norm, qk_norm_over)[1]

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None, layout: TokenLayout
    ) -> torch.Tensor:
        """context_mask (clips, L) covers the caption only (as `CrossAttention`'s); the image tokens are all
        attended."""
        b, n, dim = x.shape
        image, text = context[:, : self.image_tokens], context[:, self.image_tokens :]  # (clips, Li, D), (clips, L, D)
        q = _norm_heads(self.q(x).unflatten(-1, (self.num_heads, self.head_dim)), self.q_norm)  # (B, N, H, Dh)
        kv = self.kv(text).unflatten(-1, (2, self.num_heads, self.head_dim))  # (clips, L, 2, H, Dh)
        k, v = _norm_heads(kv[:, :, 0], self.k_norm).transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (clips, H, L, Dh)
        kv_i = self.kv_image(image).unflatten(-1, (2, self.num_heads, self.head_dim))  # (clips, Li, 2, H, Dh)
        k_i, v_i = (
            _norm_heads(kv_i[:, :, 0], self.k_image_norm).transpose(1, 2),
            kv_i[:, :, 1].transpose(1, 2),
        )  # (clips, H, Li, Dh)
        if context_mask is None:
            masks = [None] * len(layout.segments)
        else:
            if context_mask.is_floating_point():
                context_mask = context_mask.to(q.dtype)
            masks = layout.per_clip(context_mask[:, None, None, :])  # (c, 1, 1, L) each
        outs = []
        for qs, ks, vs, ms, kis, vis in zip(
            layout.split(q), layout.per_clip(k), layout.per_clip(v), masks, layout.per_clip(k_i), layout.per_clip(v_i)
        ):
            qs = qs.transpose(1, 2)  # (c, H, N_seg, Dh)
            both = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms) + F.scaled_dot_product_attention(
                qs, kis, vis
            )
            outs.append(both.transpose(1, 2))  # (c, N_seg, H, Dh)
        return self.proj(layout.merge(outs).reshape(b, n, dim))  # (B, N, D)


__all__ = ["IMAGE_NORM_EPS", "ImageEmbedder", "ImageTextCrossAttention"]
