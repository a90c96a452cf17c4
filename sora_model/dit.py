"""The Diffusion Transformer over spatio-temporal patches (article 1.1).

Conditioning follows DiT and PixArt-alpha: the timestep embedding plus the pooled caption vector
modulate each block through adaLN-Zero (shift, scale, gate), and the caption's tokens enter through
cross-attention. Gates and output projections start at zero, so every block starts as the identity
and the network starts by predicting zero: training begins from a stable point at any depth.

`DiTConfig` options make the same network a Wan2.1 transformer (`config.WAN_OPTIONS`): shared modulation
with per-block tables (`conditioning.py`), QK RMSNorm across heads, no pooled caption, zero-padded captions
attended whole, the empty prompt as the null condition. Weights convert with `convert_wan.py`. Wan2.1 I2V/FLF2V add
`image_dim` (CLIP features as extra cross-attention tokens, `image_attention.py`) and `out_channels` (a 36-channel
input: noise, mask and conditioning latents, 16 predicted).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionHook, AttentionScope, CrossAttention, SelfAttention, TokenLayout
from .captions import collapse_zero_padding
from .conditioning import ModulationTable, TimestepEmbedder, adaln_projection, full_precision
from .config import DiTConfig
from .image_attention import ImageEmbedder, ImageTextCrossAttention
from .patch import PatchEmbed, grid_positions, patch_grid, unpatchify
from .precision import FP32LayerNorm, FP32Linear, weight_dtype
from .rope import rope_frequencies, rope_rotation, sincos_position_embedding

FP32_MODULES = ("t_embedder", "pooled_embedder", "norm2", "modulation")
"""Submodules `DiT.to_inference_dtype` keeps stored in fp32: the timestep and caption embedders (small), the affine
LayerNorm and the per-block modulation tables (`shared` modulation; as Wan keeps its `scale_shift_table`). The
adaLN Linears (6 D² of a block's 22 D² parameters) go to bf16 with the rest, so the weights take half the
memory; they still compute in fp32 on upcast weights (`precision.FP32Linear`), as every module of the condition
path does when DeepSpeed's bf16 mode makes all parameters bf16 in training."""


def stored_dtype(name: str, current: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the DiT tensor `name` (a state-dict key) is kept in for inference in `dtype`: fp32 inside an
    `FP32_MODULES` submodule, `dtype` elsewhere; non-float tensors keep `current`."""
    if not current.is_floating_point:
        return current
    return torch.float32 if any(part in FP32_MODULES for part in name.split(".")[:-1]) else dtype


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, text cross-attention, adaLN-Zero MLP."""

    def __init__(self, cfg: DiTConfig, scope: AttentionScope):
        super().__init__()
        d = cfg.hidden_size
        self.scope = scope
        self.norm1 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_over)
        self.norm2 = FP32LayerNorm(d, eps=1e-6)
        if cfg.image_dim is None:
            self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_over)
        else:  # Wan2.1 I2V/FLF2V: the context holds the image tokens, then the caption's
            self.cross_attn = ImageTextCrossAttention(
                d, cfg.num_heads, cfg.image_tokens * cfg.image_count, cfg.qk_norm, cfg.qk_norm_over
            )
        self.norm3 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = cfg.mlp_hidden
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.shared_modulation = cfg.modulation == "shared"
        if self.shared_modulation:
            self.modulation = ModulationTable(6, d)
        else:
            self.adaLN_modulation = adaln_projection(d, 6)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        rope: torch.Tensor,
        layout: TokenLayout,
    ) -> torch.Tensor:
        """x (B, N, D) tokens, context (clips, L, D), c the condition (fp32 under autocast): (clips, D) for
        per-block modulation, the shared modulation (clips, 6 D) for `shared`."""
        mod = self.modulation(c) if self.shared_modulation else full_precision(self.adaLN_modulation, c)  # (clips, 6 D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (clips, D)
        # The residual stream x and the norms are fp32 (`precision.py`); each sublayer's matmuls run in its weights'
        # dtype (a no-op cast in fp32), and its output joins the fp32 stream.
        dt = weight_dtype(self.attn.qkv)
        x = layout.add_gated(
            x, self.attn(layout.modulate(self.norm1(x), shift1, scale1).to(dt), rope, layout, self.scope), gate1
        )  # (B, N, D)
        x = x + self.cross_attn(self.norm2(x).to(dt), context, context_mask, layout)  # (B, N, D)
        x = layout.add_gated(x, self.mlp(layout.modulate(self.norm3(x), shift2, scale2).to(dt)), gate2)  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a Linear to patches: adaLN of c (`per_block`), or c plus a table (`shared`)."""

    def __init__(self, hidden_size: int, patch_dim: int, shared_modulation: bool = False):
        super().__init__()
        self.norm = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_dim)
        self.shared_modulation = shared_modulation
        if shared_modulation:
            self.modulation = ModulationTable(2, hidden_size)
        else:
            self.adaLN_modulation = adaln_projection(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """x (B, N, D), c (clips, D) the condition itself (both modulation kinds) -> (B, N, P)."""
        if self.shared_modulation:
            mod = self.modulation(c.float().repeat(1, 2))  # (clips, 2 D): the table plus c, as Wan's head
        else:
            mod = full_precision(self.adaLN_modulation, c)  # (clips, 2 D)
        shift, scale = mod.chunk(2, dim=-1)  # (clips, D) each
        return self.linear(layout.modulate(self.norm(x), shift, scale).to(weight_dtype(self.linear)))  # (B, N, P)


def block_scopes(cfg: DiTConfig) -> list[AttentionScope]:
    """The attention scope of each block: temporal windows cycle over depth; factorised alternates."""
    scopes = []
    for i in range(cfg.depth):
        window = cfg.temporal_windows[i % len(cfg.temporal_windows)]
        if cfg.attention == "factorized":
            scopes.append(AttentionScope("spatial") if i % 2 == 0 else AttentionScope("temporal", window))
        else:
            scopes.append(AttentionScope("full", window))
    return scopes


class DiT(nn.Module):
    """Text-conditioned Diffusion Transformer on (B, C, T, H, W) clips or pre-patchified tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, cfg.timestep_freq_dim)
        if cfg.pooled_text:
            # condition path: fp32
            self.pooled_embedder = nn.Sequential(FP32Linear(cfg.text_dim, d), nn.SiLU(), FP32Linear(d, d))
        self.context_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        if cfg.null_text == "learned":
            # The null condition for classifier-free guidance: one learned token and pooled vector, in text space.
            self.null_text_token = nn.Parameter(torch.zeros(cfg.text_dim))
            if cfg.pooled_text:
                self.null_text_pooled = nn.Parameter(torch.zeros(cfg.text_dim))
        # `shared` modulation: one projection of c for all blocks (each adds its own table to it).
        self.modulation_proj = adaln_projection(d, 6) if cfg.modulation == "shared" else None
        self.blocks = nn.ModuleList([DiTBlock(cfg, scope) for scope in block_scopes(cfg)])
        if cfg.image_dim is not None:  # image features join the caption in cross-attention (`image_attention.py`)
            self.image_embedder = ImageEmbedder(cfg.image_dim, d, cfg.image_tokens * 2 if cfg.image_positions else None)
        self.final_layer = FinalLayer(d, cfg.out_patch_dim, cfg.modulation == "shared")
        self.gradient_checkpointing = cfg.gradient_checkpointing
        # Set from outside for one sampling call (`step_cache.StepCache`, like `set_attention_hook`); never in training.
        self.step_cache = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer linears: Xavier-uniform, zero bias (DiT).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding is a linear map per patch: initialise it like one, on its flattened view.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        # Timestep MLP: small normal, as in DiT, so early embeddings don't saturate the SiLU.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Null condition: small normal, distinct from any real caption from the first step.
        for name in ("null_text_token", "null_text_pooled"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        # Shared modulation: zero projection and zero tables give the same zero shift/scale/gate as adaLN-Zero.
        if self.modulation_proj is not None:
            nn.init.zeros_(self.modulation_proj[-1].weight)
            nn.init.zeros_(self.modulation_proj[-1].bias)
        for block in self.blocks:
            # adaLN-Zero: zero shift/scale/gate, so each block starts as the identity.
            if block.shared_modulation:
                nn.init.zeros_(block.modulation.table)
            else:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # Cross-attention is not gated: zero its output so the identity-at-init holds for it too.
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Output layer: zero, so the untrained model predicts 0 (the mean target) everywhere.
        if self.final_layer.shared_modulation:
            nn.init.zeros_(self.final_layer.modulation.table)
        else:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- conditioning ---------------------------------------------------------------------------

    def _condition(
        self,
        timestep: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        drop_text: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> c (clips, D) for adaLN (fp32 whatever the weights' dtype), context (clips, L, D) and its mask (clips, L):
        bool for `text_padding: masked`; for `attended` (`text_pooled` unused without `pooled_text`) None, or in eager
        inference the float log-weights of `collapse_zero_padding` (context then (clips, L', D)).

        No host syncs and no data-dependent shapes (but `collapse_zero_padding` in eager inference): dropped captions
        and empty masks are selected with `where`, never by indexing with a boolean tensor. (Trimming caption padding
        is the caller's job, once per batch: see `captions.trim_text_padding`.)
        """
        if text_tokens.shape[-1] != self.cfg.text_dim:
            raise ValueError(
                f"text embeddings have width {text_tokens.shape[-1]} but the model expects "
                f"model.text_dim={self.cfg.text_dim}"
            )
        if drop_text is not None and self.cfg.null_text != "learned":
            raise ValueError(
                "this model has no learned null condition (model.null_text is 'empty_prompt'): pass the empty "
                "prompt's embedding in place of dropped captions instead of drop_text"
            )
        text_mask = text_mask.bool()
        if drop_text is not None:
            drop = drop_text.bool().to(text_tokens.device)
            null_tokens = self.null_text_token.to(text_tokens.dtype).expand_as(text_tokens)
            text_tokens = torch.where(drop[:, None, None], null_tokens, text_tokens)  # (B, L, Dt)
            only_first = torch.zeros_like(text_mask)
            only_first[:, 0] = True
            text_mask = torch.where(drop[:, None], only_first, text_mask)  # (B, L)
            if self.cfg.pooled_text:
                null_pooled = self.null_text_pooled.to(text_pooled.dtype).expand_as(text_pooled)
                text_pooled = torch.where(drop[:, None], null_pooled, text_pooled)  # (B, Dt)
        context_mask: torch.Tensor | None = None
        if self.cfg.text_padding == "masked":
            # A caption with no tokens would leave cross-attention rows with nothing to attend to (NaN).
            first = text_mask[:, :1] | ~text_mask.any(-1, keepdim=True)  # (B, 1)
            context_mask = torch.cat([first, text_mask[:, 1:]], dim=1)  # (B, L)
        elif not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Inference, eager: attend to one copy of a caption's zero tail, weighted by how many rows it stands for.
            text_tokens, context_mask = collapse_zero_padding(text_tokens)  # (B, L', Dt), (B, L') | None
        with torch.autocast(text_tokens.device.type, enabled=False):
            c = self.t_embedder(timestep)  # (B, D) fp32
            if self.cfg.pooled_text:
                c = c + self.pooled_embedder(text_pooled.float())  # (B, D) fp32
        context = self.context_embedder(text_tokens.to(weight_dtype(self.context_embedder[0])))  # (B, L, D)
        return c, context, context_mask

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        video: torch.Tensor,
        timestep: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        drop_text: torch.Tensor | None = None,
        grids: tuple[tuple[int, int, int], ...] | TokenLayout | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise a batch of same-size clips, or a packed batch of clips of any sizes.

        Without `grids`: video (B, C, T, H, W) -> prediction (B, C, T, H, W).
        With `grids` (one (T', H', W') per clip, Python ints): `video` is the clips' patchified tokens
        concatenated clip after clip, (ΣN, P) or (1, ΣN, P), and the prediction has the same shape (NaViT
        packing: no padding, each clip attends only to itself and its own caption and timestep).
        timestep (clips,), text_tokens (clips, L, Dt), text_mask (clips, L), text_pooled (clips, Dt).
        With `grids` a TokenLayout of one segment sharded `(index, count)`: `video` is (B, N/count, P), the
        index-th contiguous piece of B same-grid clips' tokens, and so is the result. Only correct with an attention
        hook that gives attention the whole sequence: sequence parallelism, applied from `pipelines/` (the hook and
        the layout are all the model sees of it).
        Image-conditioned models (`model.image_dim`) take image_features (clips, images * image_tokens, image_dim), the
        image encoder's features of each clip's conditioning image(s), and predict out_channels (out_patch_dim) only.
        """
        cond = (timestep, text_tokens, text_mask, text_pooled, drop_text, self._check_image_features(image_features))
        if isinstance(grids, TokenLayout):
            return self._denoise_shard(video, *cond, grids)
        if grids is not None:
            layout = TokenLayout.from_grids(grids)
            tokens = video.reshape(1, -1, video.shape[-1])  # (1, ΣN, P)
            if tokens.shape[1] != layout.num_tokens or tokens.shape[2] != self.cfg.patch_dim:
                raise ValueError(
                    f"packed tokens of shape {tuple(video.shape)} do not match {layout.num_clips} clip grids "
                    f"(expected {layout.num_tokens} tokens of width model.patch_dim={self.cfg.patch_dim})"
                )
            if timestep.shape[0] != layout.num_clips or text_tokens.shape[0] != layout.num_clips:
                raise ValueError(
                    f"a packed batch of {layout.num_clips} clips needs one timestep and caption per clip, "
                    f"got {timestep.shape[0]} timesteps and {text_tokens.shape[0]} captions"
                )
            out = self._denoise(self.patch_embed(tokens.to(self.dtype)), layout, *cond)  # (1, ΣN, P_out)
            return out.reshape(*video.shape[:-1], self.cfg.out_patch_dim)
        if video.ndim != 5 or video.shape[1] != self.cfg.in_channels:
            raise ValueError(f"DiT expects (B, {self.cfg.in_channels}, T, H, W) input, got shape {tuple(video.shape)}")
        grid = patch_grid(tuple(video.shape[2:]), self.cfg.patch_size)
        layout = TokenLayout.dense(grid, video.shape[0])
        out = self._denoise(self.patch_embed(video.to(self.dtype)), layout, *cond)  # (B, N, P_out)
        return unpatchify(out, grid, self.cfg.patch_size, self.cfg.predicted_channels)  # (B, C_out, T, H, W)

    def _check_image_features(self, features: torch.Tensor | None) -> torch.Tensor | None:
        """The image features of an image-conditioned model, checked; an error for them on a text-only model."""
        cfg = self.cfg
        if cfg.image_dim is None:
            if features is not None:
                raise ValueError("this model is text-only (model.image_dim is not set): it takes no image features")
            return None
        expected = (cfg.image_tokens * cfg.image_count, cfg.image_dim)
        if features is None or features.ndim != 3 or tuple(features.shape[1:]) != expected:
            got = None if features is None else tuple(features.shape)
            raise ValueError(
                f"this image-conditioned model needs image_features of shape (clips, {expected[0]}, "
                f"{expected[1]}), got {got}"
            )
        return features

    def _denoise_shard(
        self, tokens, timestep, text_tokens, text_mask, text_pooled, drop_text, image_features, layout
    ) -> torch.Tensor:
        """(B, N/count, P) tokens of one sequence shard -> their (B, N/count, P) predictions."""
        index, count = layout.shard
        if layout.packed or len(layout.segments) != 1:
            raise ValueError("a sequence shard is one segment of same-grid clips, not a packed batch")
        grid = tuple(layout.segments[0][0])
        n = math.prod(grid)
        if n % count or self.cfg.num_heads % count or not 0 <= index < count:
            raise ValueError(
                f"sequence parallelism over {count} ranks needs the tokens per clip ({n}) and model.num_heads "
                f"({self.cfg.num_heads}) divisible by {count}"
            )
        if tokens.ndim != 3 or tokens.shape[1] != n // count:
            raise ValueError(
                f"shard {index} of {count} holds {n // count} tokens per clip, got shape {tuple(tokens.shape)}"
            )
        if layout.segments[0][1] != tokens.shape[0]:
            raise ValueError(f"the layout holds {layout.segments[0][1]} clips, the tokens {tokens.shape[0]}")
        return self._denoise(
            self.patch_embed(tokens.to(self.dtype)),
            layout,
            timestep,
            text_tokens,
            text_mask,
            text_pooled,
            drop_text,
            image_features,
        )

    def _denoise(
        self, x, layout, timestep, text_tokens, text_mask, text_pooled, drop_text, image_features=None
    ) -> torch.Tensor:
        """(B, N, D) embedded tokens laid out as `layout` -> (B, N, P_out) predictions."""
        # 1. Conditions, positions (built on the device from the layout's ints: nothing copied from the host).
        c, context, context_mask = self._condition(timestep, text_tokens, text_mask, text_pooled, drop_text)
        if image_features is not None:  # image tokens first, then the caption's (Wan's order)
            image = self.image_embedder(image_features)  # (clips, Li, D)
            context = torch.cat([image.to(context.dtype), context], dim=1)  # (clips, Li + L, D)
        # `shared` modulation: the blocks take the one projection of c (computed once), the output head c.
        block_c = c if self.modulation_proj is None else full_precision(self.modulation_proj, c)  # (clips, D | 6 D)
        positions = layout_positions(layout, x.device)  # (1, N, 3)
        x = self._add_absolute_positions(x.float(), positions)  # (B, N, D) fp32: the residual stream
        rope = rope_rotation(
            positions, rope_frequencies(self.cfg.head_dim, self.cfg.rope_split, self.cfg.rope_theta, x.device)
        )
        # 2. Transformer blocks (or a step cache's reuse of their residual) and the output projection back to patches.
        if self.step_cache is not None and not self.training:
            x = self.step_cache.run_blocks(self.blocks, x, block_c, context, context_mask, rope, layout)  # (B, N, D)
        else:
            for block in self.blocks:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, block_c, context, context_mask, rope, layout, use_reentrant=False)
                else:
                    x = block(x, block_c, context, context_mask, rope, layout)  # (B, N, D)
        return self.final_layer(x, c, layout)  # (B, N, P)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise pre-patchified, right-padded tokens: a convenience over the packed `forward`.

        tokens (B, N, P) in t-major grid order, positions (B, N, 3) or (N, 3), token_mask (B, N) True for
        real tokens (a prefix of each row). Returns (B, N, P); padded positions are zero. Reading the
        clips' lengths and grids off the mask costs host syncs: training and compiled code call `forward`
        with `grids` directly. Goes through `__call__`, so ZeRO-3's hooks gather every weight it uses.
        """
        b, n, p = tokens.shape
        if positions.ndim == 2:
            positions = positions.unsqueeze(0).expand(b, -1, -1)  # (B, N, 3)
        lengths = [n] * b if token_mask is None else token_mask.sum(-1).tolist()
        grids = tuple(
            grid if grid is not None and length == n else tuple(int(v) + 1 for v in positions[i, length - 1].tolist())
            for i, length in enumerate(lengths)
        )
        for i, (length, g) in enumerate(zip(lengths, grids)):
            if (
                length == 0
                or math.prod(g) != length
                or (token_mask is not None and not bool(token_mask[i, :length].all()))
            ):
                raise ValueError(
                    f"clip {i}: its {length} real tokens must be the first tokens of its row, in "
                    "t-major order of a full grid"
                )
        packed = torch.cat([tokens[i, :length] for i, length in enumerate(lengths)])  # (ΣN, P)
        out = self(packed, timestep, text_tokens, text_mask, text_pooled, drop_text=drop_text, grids=grids)  # (ΣN, P)
        result = out.new_zeros(b, n, out.shape[-1])
        for i, part in enumerate(out.split(lengths)):
            result[i, : lengths[i]] = part
        return result  # (B, N, P)

    def _add_absolute_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens + fixed sin-cos features of their (B or 1, N, 3) positions, when configured."""
        if not self.cfg.absolute_positions:
            return x
        return x + sincos_position_embedding(positions, self.cfg.hidden_size).to(device=x.device, dtype=x.dtype)

    def to_inference_dtype(self, dtype: torch.dtype = torch.bfloat16) -> DiT:
        """Cast the weights to `dtype` for inference, except the conditioning path and norms with weights.

        Half the memory of fp32 weights under autocast. The timestep and pooled-caption embedders and the
        affine cross-attention norms stay fp32 (`FP32_MODULES`, as Wan keeps its time embedding); adaLN's
        shift, scale and gate and the residual stream they act on are fp32 whatever the weights' dtype.
        Tensor by tensor (`stored_dtype`): the fp32 modules are never rounded through `dtype`, and a second call
        changes nothing. An export loads straight into these dtypes (`dit_load.load_dit`).
        """
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            want = stored_dtype(name, t.dtype, dtype)
            if want != t.dtype:
                t.data = t.data.to(want)
        return self

    def set_attention_hook(self, hook: AttentionHook | None) -> None:
        """Wrap every self-attention's local attention (sequence parallelism installs its all-to-all here)."""
        for block in self.blocks:
            block.attn.hook = hook

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, read off the patch embedding (a Conv3d, which int8 quantisation leaves as is)."""
        return self.patch_embed.proj.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def layout_positions(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(1, N, 3) integer (t, h, w) positions of a layout's tokens: every clip counts from its own origin."""
    if not layout.packed:
        positions = grid_positions(layout.segments[0][0], device=device)  # (N, 3)
        index, count = layout.shard
        return positions.chunk(count)[index][None]  # (1, N/count, 3)
    return torch.cat([grid_positions(grid, device=device).repeat(count, 1) for grid, count in layout.segments])[
        None
    ]  # (1, ΣN, 3)


__all__ = [
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedder",
    "block_scopes",
    "collapse_zero_padding",
    "layout_positions",
    "stored_dtype",
]
