"""Sequence parallelism (DeepSpeed-Ulysses) for long clips, applied to an unchanged DiT from outside.

A clip of N tokens is split into `sp` contiguous pieces, one per rank of a sequence-parallel group; every
layer except self-attention works on its own piece. Around each self-attention, an all-to-all turns
"my N/sp tokens, all H heads" into "all N tokens, my H/sp heads", attention runs on whole clips (any scope,
windows included), and a second all-to-all turns it back (Jacobs et al., DeepSpeed-Ulysses, 2023). Per-rank
activation memory falls as 1/sp; communication per layer is 4 all-to-alls of the local q, k, v, out.

    install_ulysses(model, group)        # every SelfAttention's hook: all-to-all around local attention
    out = sequence_parallel_forward(engine_or_model, video, t, text_tokens, text_mask, text_pooled,
                                    drop_text, group)   # (B, C, T, H, W) on every rank of the group

How training uses it (`pipelines/train/worker.py`, recipe `sequence_parallel_size`): the ranks of a group
train on the same micro-batch (the group's first rank, its only reader, broadcasts it) with the same noise; the
prediction is all-gathered so every rank computes the same loss, and the backward of that gather hands each rank its
piece's gradient. Each rank's weight gradients are then its piece's share of the full gradient, so the loss is scaled by
sp before backward: DeepSpeed's mean over the data-parallel world (ZeRO-3's reduce-scatter over all ranks) then sums the
shares within a group and averages over groups.

`sora_model` never imports torch.distributed: the model only offers the attention hook and the
shard layout (`TokenLayout.shard`); every collective lives here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sora_model.attention import TokenLayout
from sora_model.patch import patch_grid, patchify, unpatchify


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (one equal block per rank); its gradient is the same exchange back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a permuted input's strides
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _GatherSequence(torch.autograd.Function):
    """All-gather the pieces along dim 1; backward keeps this rank's slice (every rank's loss is the same)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.chunk(ctx.size, dim=1)[ctx.rank].contiguous(), None


def seq_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, H, N/sp, Dh) this rank's tokens, all heads -> (B, H/sp, N, Dh) all tokens, this rank's heads."""
    sp = dist.get_world_size(group)
    b, h, n, d = x.shape
    x = x.reshape(b, sp, h // sp, n, d).permute(1, 0, 2, 3, 4)  # (sp: to rank, B, H/sp, N/sp, Dh)
    x = _AllToAll.apply(x, group)  # (sp: from rank = sequence piece, B, H/sp, N/sp, Dh)
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * n, d)  # (B, H/sp, N, Dh)


def heads_to_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (B, H/sp, N, Dh) -> (B, H, N/sp, Dh)."""
    sp = dist.get_world_size(group)
    b, hs, n, d = x.shape
    x = x.reshape(b, hs, sp, n // sp, d).permute(2, 0, 1, 3, 4)  # (sp: to rank = sequence piece, B, H/sp, N/sp, Dh)
    x = _AllToAll.apply(x, group)  # (sp: from rank = head group, B, H/sp, N/sp, Dh)
    return x.permute(1, 0, 2, 3, 4).reshape(b, sp * hs, n // sp, d)  # (B, H, N/sp, Dh)


def install_ulysses(model: torch.nn.Module, group: Any) -> None:
    """Set every self-attention's hook to run its local attention between two all-to-alls."""

    def hook(q, k, v, attend):
        return heads_to_seq(attend(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group)), group)

    model.set_attention_hook(hook)


def sequence_parallel_forward(
    model: Any,
    video: torch.Tensor,
    timestep: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    drop_text: torch.Tensor | None,
    group: Any,
    patch_size: tuple[int, int, int],
    in_channels: int,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DiT's (B, C, T, H, W) prediction, computed 1/sp per rank; every rank of `group` gets all of it.

    `model` is the DiT or the DeepSpeed engine around it (called, so ZeRO-3's hooks gather the weights);
    its attention hooks must be `install_ulysses`'s. All ranks of the group pass the same inputs.
    """
    rank, sp = dist.get_rank(group), dist.get_world_size(group)
    grid = patch_grid(tuple(video.shape[2:]), patch_size)
    tokens = patchify(video, patch_size)  # (B, N, P)
    if tokens.shape[1] % sp:
        raise ValueError(
            f"sequence_parallel_size {sp} must divide the {tokens.shape[1]} tokens per clip of grid {grid}"
        )
    piece = tokens.chunk(sp, dim=1)[rank]  # (B, N/sp, P)
    layout = TokenLayout(((grid, piece.shape[0]),), shard=(rank, sp))  # where this rank's tokens sit
    out = model(
        piece,
        timestep,
        text_tokens,
        text_mask,
        text_pooled,
        drop_text=drop_text,
        grids=layout,
        image_features=image_features,
    )  # an image-to-video model's features: every piece attends to them
    full = _GatherSequence.apply(out, group)  # (B, N, P)
    return unpatchify(full, grid, patch_size, in_channels)  # (B, C, T, H, W)


def collective_device(backend: str) -> torch.device:
    """Where a tensor must be for a collective on `backend`: NCCL moves CUDA tensors only, gloo CPU ones."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")
    return torch.device("cpu")


def broadcast_batch(batch: dict[str, Any] | None, group: Any, src: int, device: torch.device) -> dict[str, Any]:
    """The group's reader's micro-batch on every rank of the group (`batch` is None on the others).

    What describes it (keys, shapes, dtypes, and small Python values such as a pack's grids) goes by one object
    broadcast; the tensors by `dist.broadcast` on the group's device, each landing on `device`. Pickling tensors
    into `broadcast_object_list` would copy every CUDA tensor to the host and back, and on NCCL the pickled
    bytes themselves travel through the GPU.
    """
    mine = dist.get_rank() == src
    meta: list[Any] = [None]
    if mine:
        meta[0] = {
            k: ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v) for k, v in batch.items()
        }
    dist.broadcast_object_list(meta, src=src, group=group)
    wire = collective_device(dist.get_backend(group))
    out: dict[str, Any] = {}
    for key, desc in meta[0].items():
        if desc[0] == "value":
            out[key] = batch[key] if mine else desc[1]
            continue
        _, shape, dtype = desc
        t = batch[key].to(wire) if mine else torch.empty(shape, dtype=dtype, device=wire)
        dist.broadcast(t, src=src, group=group)
        out[key] = batch[key] if mine else t.to(device)
    return out


def new_groups(world: int, sp: int) -> tuple[Any, int, int]:
    """Sequence-parallel groups of `sp` consecutive ranks -> (this rank's group, its first rank, dp rank).

    Every rank must call it (new_group is collective). Consecutive ranks keep a group on one node where
    nodes hold consecutive ranks, which is where all-to-all is fastest.
    """
    if world % sp:
        raise ValueError(f"sequence_parallel_size {sp} must divide the number of workers {world}")
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, sp):
        group = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            mine = group
    return mine, rank - rank % sp, rank // sp
