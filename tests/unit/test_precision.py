"""The model's precision policy with every parameter in bf16 (DeepSpeed's bf16 mode): no Ray, no DeepSpeed.

DeepSpeed's bf16 engine casts every parameter (norm weights, embedders, modulation tables) to bf16 and keeps the
fp32 masters in the optimizer. The network must then still compute its norms, condition path and residual
stream in fp32 (`sora_model/precision.py`), for the DiT (per-block adaLN) and its Wan mode (shared modulation).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sora_model.config import WAN_OPTIONS, dit_preset
from sora_model.dit import DiT
from sora_model.precision import FP32LayerNorm, FP32Linear

TEXT_DIM = 16
MODES = {
    "dit": dict(temporal_windows=(2, 0)),
    "dit-pooled-learned-null": dict(absolute_positions=True),
    "wan": {**WAN_OPTIONS, "in_channels": 3, "text_dim": TEXT_DIM, "timestep_freq_dim": 32, "ffn_dim": 48},
}


def model_pair(mode: str) -> tuple[DiT, DiT]:
    """(fp32 model, the same weights with every parameter cast to bf16 as DeepSpeed's bf16 mode does)."""
    torch.manual_seed(0)
    model = DiT(dit_preset("DiT-tiny", **{"text_dim": TEXT_DIM, **MODES[mode]}))
    with torch.no_grad():  # non-zero everywhere (adaLN, output layer, tables), so every path counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    low = DiT(model.cfg)
    low.load_state_dict(model.state_dict())
    return model, low.to(torch.bfloat16)


def inputs(b: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[:, 3:] = False
    x = torch.randn(b, 3, 4, 8, 8, generator=g)
    return (
        x,
        torch.tensor([3.0, 700.0][:b]),
        torch.randn(b, 5, TEXT_DIM, generator=g),
        mask,
        torch.randn(b, TEXT_DIM, generator=g),
    )


@pytest.mark.parametrize("mode", MODES)
def test_all_bf16_parameters_train_with_fp32_norms_condition_and_residual(mode):
    ref, model = model_pair(mode)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seen: dict[str, set] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, set()).add(output.dtype)

        return hook

    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, FP32LayerNorm)):
            module.register_forward_hook(record("norm"))
    for block in model.blocks:
        block.register_forward_hook(record("residual"))
        block.attn.qkv.register_forward_hook(record("qkv"))
        block.mlp.register_forward_hook(record("mlp"))
        (block.modulation if block.shared_modulation else block.adaLN_modulation).register_forward_hook(
            record("modulation")
        )
    model.t_embedder.register_forward_hook(record("timestep"))

    x, t, tokens, mask, pooled = inputs()
    drop = torch.tensor([False, True]) if model.cfg.null_text == "learned" else None
    out = model(x, t, tokens, mask, pooled, drop_text=drop)
    out.float().square().mean().backward()

    # Norms, the timestep and modulation path, and the residual stream computed in fp32; matmuls in bf16.
    assert seen["norm"] == {torch.float32} and seen["timestep"] == {torch.float32}
    assert seen["modulation"] == {torch.float32} and seen["residual"] == {torch.float32}
    assert seen["qkv"] == {torch.bfloat16} and seen["mlp"] == {torch.bfloat16}
    # Every parameter receives a finite gradient in its own dtype (what DeepSpeed hands its fp32 masters).
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad.float()).all(), name
    # The same function as the fp32 model, to bf16's precision (8-bit mantissa: ~0.4% per rounding).
    with torch.no_grad():
        want = ref(x, t, tokens, mask, pooled, drop_text=drop)
        got = model(x, t, tokens, mask, pooled, drop_text=drop).float()
    assert (got - want).abs().max() < 0.03 * want.abs().max(), mode


def test_precision_modules_equal_torch_in_fp32_and_upcast_bf16_weights():
    """In fp32 they are exactly nn.Linear / nn.LayerNorm; with bf16 weights they compute in fp32 (upcast weights)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    linear, norm = FP32Linear(8, 4), FP32LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(8))
    plain_linear, plain_norm = nn.Linear(8, 4), nn.LayerNorm(8, eps=1e-6)
    plain_linear.load_state_dict(linear.state_dict())
    plain_norm.load_state_dict(norm.state_dict())
    assert torch.equal(linear(x), plain_linear(x)) and torch.equal(norm(x), plain_norm(x))
    linear.to(torch.bfloat16), norm.to(torch.bfloat16)
    y, n = linear(x), norm(x)
    assert y.dtype == n.dtype == torch.float32
    w, b = linear.weight.float(), linear.bias.float()
    assert torch.equal(y, x @ w.T + b)  # fp32 arithmetic on the bf16-rounded weights
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not pull them back to bf16
        assert linear(x).dtype == torch.float32 and norm(x).dtype == torch.float32


def test_bf16_gradients_match_fp32_gradients():
    """A backward pass through all-bf16 parameters gives the fp32 model's gradients to bf16 precision."""
    ref, model = model_pair("dit")
    x, t, tokens, mask, pooled = inputs()
    for m in (ref, model):
        m(x, t, tokens, mask, pooled).float().square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # the learned null gets none without dropped captions
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item()
        if scale > 0:
            assert (q.grad.float() - p.grad).abs().max().item() < 0.1 * scale, name
