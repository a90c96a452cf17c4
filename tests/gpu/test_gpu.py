"""GPU checks (`pytest -m gpu`): the flash kernel in every attention scope, DiT-XL/2 at 64k tokens in bf16.

Skipped where there is no CUDA device (every CPU machine, CI included). They run on a GPU machine with
only torch installed besides this repository: nothing here imports Ray, DeepSpeed or diffusers. With
`SORA_GPU_FIGURES=PATH` set, the measured figures (peak memory, seconds) are written there as JSON.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sora_model.attention import AttentionScope, SelfAttention, TokenLayout, scoped_attention
from sora_model.config import dit_preset
from sora_model.dit import DiT, layout_positions
from sora_model.rope import rope_frequencies, rope_rotation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)"
    ),
]

SCOPES = {
    "full": AttentionScope("full", 0),
    "full-window-4-ragged": AttentionScope("full", 4),  # T' = 9: two windows of 4 and a remainder of 1
    "spatial": AttentionScope("spatial", 0),
    "temporal": AttentionScope("temporal", 0),
    "temporal-window-4-ragged": AttentionScope("temporal", 4),
}


def _record(name: str, figures: dict) -> None:
    path = os.environ.get("SORA_GPU_FIGURES")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.isfile(path) else {}
    data[name] = figures
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _qkv(b: int, h: int, n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    # (B, N, H, Dh) storage read through transposed views, as SelfAttention hands them to SDPA
    return [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("name", list(SCOPES))
def test_flash_kernel_takes_every_scope(name):
    """Under `sdpa_kernel([FLASH_ATTENTION])` SDPA raises when flash cannot run: every scope must run there,
    and agree with the math kernel to bf16 precision."""
    grid = (9, 16, 16)
    q, k, v = _qkv(2, 16, 9 * 16 * 16, 72)  # DiT-XL's head width
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = scoped_attention(q, k, v, grid, SCOPES[name])
    with sdpa_kernel([SDPBackend.MATH]):
        ref = scoped_attention(q.float(), k.float(), v.float(), grid, SCOPES[name])
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "scope", [AttentionScope("full", 4), AttentionScope("temporal", 0)], ids=["window", "temporal"]
)
def test_flash_kernel_takes_packed_batches(scope):
    """A NaViT-packed batch (two grids in one sequence) attends each clip with the flash kernel."""
    torch.manual_seed(0)
    attn = SelfAttention(1152, 16).cuda().to(torch.bfloat16)
    grids = [(5, 8, 8), (9, 4, 6), (5, 8, 8)]
    layout = TokenLayout.from_grids(grids)
    x = torch.randn(1, layout.num_tokens, 1152, device="cuda", dtype=torch.bfloat16)
    rope = rope_rotation(
        layout_positions(layout, torch.device("cuda")), rope_frequencies(72, device=torch.device("cuda"))
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = attn(x, rope, layout, scope)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_dit_xl_64k_tokens_bf16_forward_backward_fits():
    """DiT-XL/2 (675M parameters), one clip of 16 x 128 x 128 latents = 65,536 tokens, bf16 autocast,
    gradient checkpointing: forward and backward fit and give finite gradients; peak memory recorded."""
    torch.manual_seed(0)
    model = DiT(dit_preset("DiT-XL/2", in_channels=4, text_dim=384, gradient_checkpointing=True)).cuda().train()
    x = torch.randn(1, 4, 16, 128, 128, device="cuda")
    tokens = 16 * 64 * 64
    text = (
        torch.randn(1, 32, 384, device="cuda"),
        torch.ones(1, 32, dtype=torch.bool, device="cuda"),
        torch.randn(1, 384, device="cuda"),
    )
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # Self-attention on flash; the caption cross-attention carries a key mask, which flash does not take. Backward
    # runs inside the same kernel choice: checkpointing recomputes each block there, and a recompute that picked
    # another kernel (cuDNN, by default on Hopper) would save tensors of other shapes (seen on an H200).
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, torch.tensor([500.0], device="cuda"), *text)
            loss = torch.nn.functional.mse_loss(out.float(), x)
        loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    peak = torch.cuda.max_memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    _record(
        "dit_xl_64k_tokens",
        {
            "tokens": tokens,
            "params": model.num_parameters(),
            "peak_gib": round(peak, 2),
            "device_gib": round(total, 1),
            "forward_backward_seconds_first_step": round(seconds, 2),
            "device": torch.cuda.get_device_name(0),
        },
    )
    assert peak < total
