"""The Wan-mode forward's speed changes compute the same thing (issue 30 item 3).

- `collapse_zero_padding`: attending to one zero row with logit + log(copies) equals attending to all the copies
  (the DiT's output in eager inference equals the uncollapsed forward's, batch of captions of different lengths,
  packed too); nothing is cut from captions without zero tails; training keeps every column.
- `PatchEmbed` on a video gives contiguous tokens (the residual stream) equal to the Conv3d over the clip.
"""

from __future__ import annotations

import pytest
import torch

import sora_model.dit as dit_module
from sora_model.config import WAN_OPTIONS, DiTConfig
from sora_model.dit import DiT, collapse_zero_padding
from sora_model.patch import PatchEmbed, patchify

TEXT_DIM, L = 24, 40


def _wan_dit() -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig(
        **{
            **WAN_OPTIONS,
            "in_channels": 4,
            "text_dim": TEXT_DIM,
            "hidden_size": 32,
            "depth": 2,
            "num_heads": 2,
            "ffn_dim": 48,
            "patch_size": (1, 2, 2),
            "rope_split": (8, 4, 4),
        }
    )
    model = DiT(cfg)
    with torch.no_grad():  # DiT starts as the identity (zero gates and output): give every weight a value
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _captions(lengths: list[int]) -> torch.Tensor:
    text = torch.randn(len(lengths), L, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    for i, n in enumerate(lengths):
        text[i, n:] = 0  # Wan's zero padding
    return text


def _forward(model: DiT, text: torch.Tensor, **kw) -> torch.Tensor:
    b = text.shape[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 4, 3, 4, 6, generator=g)
    return model(
        x,
        torch.linspace(100, 900, b),
        text,
        torch.ones(text.shape[:2], dtype=torch.bool),
        torch.zeros(b, TEXT_DIM),
        **kw,
    )


def test_collapse_zero_padding_shapes_and_weights() -> None:
    text = _captions([5, 9, 0])
    tokens, weights = collapse_zero_padding(text)
    assert tokens.shape == (3, 10, TEXT_DIM) and torch.equal(tokens, text[:, :10])
    expected = torch.zeros(3, 10)
    expected[0, 5:] = torch.tensor((L - 5) / 5).log()  # 35 zero rows as 5
    expected[1, 9:] = torch.tensor(float(L - 9)).log()  # 31 zero rows as 1
    expected[2, :] = torch.tensor(L / 10).log()  # an all-zero caption: 40 rows as 10
    assert torch.allclose(weights, expected)
    interior = text.clone()
    interior[0, 2] = 0  # a zero row inside a caption is no padding: kept as a real column
    assert torch.equal(collapse_zero_padding(interior)[1][0], expected[0])
    full = torch.randn(2, L, TEXT_DIM)
    assert collapse_zero_padding(full)[1] is None and collapse_zero_padding(full)[0] is full


def test_dit_output_with_collapsed_padding_equals_full_attention(monkeypatch) -> None:
    model = _wan_dit()
    text = _captions([7, 3])
    with torch.no_grad():
        got = _forward(model, text)
        monkeypatch.setattr(dit_module, "collapse_zero_padding", lambda tokens: (tokens, None))  # every column
        expected = _forward(model, text)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), diff
    assert expected.abs().max().item() > 0.1  # a model that reads its caption (not a zero output)


def test_packed_forward_with_collapsed_padding_equals_full_attention(monkeypatch) -> None:
    model = _wan_dit()
    text = _captions([12, 2])
    x = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([patchify(c[None], (1, 2, 2))[0] for c in x])  # (2N, P)
    args = (torch.tensor([999.0, 250.0]), text, torch.ones(2, L, dtype=torch.bool), torch.zeros(2, TEXT_DIM))
    with torch.inference_mode():
        got = model(tokens, *args, grids=((3, 2, 3), (3, 2, 3)))
        monkeypatch.setattr(dit_module, "collapse_zero_padding", lambda t: (t, None))
        expected = model(tokens, *args, grids=((3, 2, 3), (3, 2, 3)))
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_training_forward_keeps_every_caption_column(monkeypatch) -> None:
    model = _wan_dit().train()
    calls = []
    monkeypatch.setattr(dit_module, "collapse_zero_padding", lambda t: calls.append(t) or (t, None))
    _forward(model, _captions([4, 6])).sum().backward()
    assert calls == []  # with gradients: no host sync, the full caption
    with torch.no_grad():
        _forward(model, _captions([4, 6]))
    assert len(calls) == 1


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_patch_embed_video_gives_contiguous_tokens_equal_to_conv(patch) -> None:
    torch.manual_seed(0)
    embed = PatchEmbed(4, 16, patch)
    video = torch.randn(2, 4, 4, 6, 8)
    with torch.no_grad():
        tokens = embed(video)
        reference = embed.proj(video).flatten(2).transpose(1, 2)  # (B, N, D): Conv3d over the clip
    assert tokens.is_contiguous()
    assert torch.allclose(tokens, reference, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        embed(torch.randn(1, 4, 4, 5, 8))


def test_rms_norm_inference_path_equals_torch_rms_norm() -> None:
    from sora_model.attention import RMSNorm

    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 50, 64) * 5
    with torch.no_grad():
        got = norm(x)  # the one-reduction CPU path
    reference = torch.nn.functional.rms_norm(x, (64,), norm.weight, 1e-6)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(norm(x), reference)  # with gradients: torch's kernel itself


def test_add_gated_equals_add_of_gate_packed() -> None:
    from sora_model.attention import TokenLayout

    layout = TokenLayout.from_grids([(1, 2, 3), (2, 2, 2), (2, 2, 2)])
    x, y = torch.randn(1, layout.num_tokens, 8), torch.randn(1, layout.num_tokens, 8)
    gate = torch.randn(3, 8)
    assert torch.allclose(layout.add_gated(x, y, gate), x + layout.gate(y, gate), atol=1e-6)
