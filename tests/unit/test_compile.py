"""torch.compile readiness: no graph break (fullgraph), one compile per bucket, packed and dense alike.

Dynamo tracing is what finds graph breaks, host syncs (`.item()`, `.nonzero()`, `bool(tensor)`) and
data-dependent shapes; the backends here skip Inductor's code generation so the checks stay fast.
Inductor's speed is the `compile_train_step_ratio` benchmark's business.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from sora_model.config import dit_preset
from sora_model.dit import DiT

TEXT_DIM = 16


def _model(**overrides) -> DiT:
    torch.manual_seed(0)
    model = DiT(dit_preset("DiT-tiny", text_dim=TEXT_DIM, temporal_windows=(2, 0), **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _text(b: int):
    g = torch.Generator().manual_seed(b)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:, 4:] = False
    return torch.randn(b, 6, TEXT_DIM, generator=g), mask, torch.randn(b, TEXT_DIM, generator=g)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_train_step_compiles_with_no_graph_break_and_matches_eager(attention):
    """fullgraph=True raises on any graph break; aot_eager traces the backward too. T' = 5 with window 2
    is ragged, and caption dropout, empty-caption handling and gradient checkpointing are all in the graph."""
    model = _model(attention=attention, gradient_checkpointing=True).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=False)
    x = torch.randn(2, 3, 5, 8, 8)
    tokens, mask, pooled = _text(2)
    mask[1] = False  # a caption with no tokens
    args = (x, torch.tensor([3.0, 700.0]), tokens, mask, pooled)
    drop = torch.tensor([True, False])
    grads = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        out = fn(*args, drop_text=drop)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert counter.frame_count == 1
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_one_compile_per_bucket_dense_and_packed():
    """Alternating between buckets (and packed layouts) compiles each once, never again."""
    model = _model().eval()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=False)
    buckets = [(1, 8, 8), (4, 8, 8), (5, 4, 8)]
    packed_grids = ((4, 4, 4), (4, 4, 4), (1, 4, 4))
    n_packed = sum(g[0] * g[1] * g[2] for g in packed_grids)
    with torch.no_grad():
        for _ in range(2):
            for thw in buckets:
                compiled(torch.randn(2, 3, *thw), torch.tensor([1.0, 2.0]), *_text(2))
            out = compiled(torch.randn(n_packed, 12), torch.tensor([1.0, 2.0, 3.0]), *_text(3), grids=packed_grids)
            assert out.shape == (n_packed, 12)
    assert counter.frame_count == len(buckets) + 1


def test_wan_options_train_step_compiles_with_no_graph_break_and_matches_eager():
    """The Wan2.1 options (shared modulation tables, QK norm across heads, no pooled text, attended caption padding,
    no learned null) keep the model free of graph breaks and host syncs, dense and packed, with checkpointing."""
    from sora_model.config import WAN_OPTIONS

    wan = {k: v for k, v in WAN_OPTIONS.items() if k not in ("in_channels", "text_dim")}  # tiny sizes stay
    model = _model(**wan, ffn_dim=40, gradient_checkpointing=True).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=False)
    tokens, mask, pooled = _text(2)
    cases = [
        (torch.randn(2, 3, 5, 8, 8), {}),
        (torch.randn(4 * 4 * 4 + 2 * 4 * 4, 12), {"grids": ((4, 4, 4), (2, 4, 4))}),
    ]
    for x, kw in cases:
        outs = []
        for fn in (compiled, model):
            model.zero_grad(set_to_none=True)
            out = fn(x, torch.tensor([3.0, 700.0]), tokens, mask, pooled, **kw)
            out.square().mean().backward()
            outs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        for name, g in outs[0][1].items():
            torch.testing.assert_close(g, outs[1][1][name], rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 2  # one graph per layout, no break
