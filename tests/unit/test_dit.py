"""DiT, attention, RoPE and patching: shared checks run over every model variant."""

from __future__ import annotations

import pytest
import torch

from sora_model.attention import AttentionScope, SelfAttention, TokenLayout
from sora_model.config import ConfigError, DiTConfig, LossConfig, PipelineConfig, dit_preset, from_dict, to_dict
from sora_model.dit import DiT, DiTBlock
from sora_model.patch import PatchEmbed, grid_positions, patch_grid, patchify, unpatchify
from sora_model.rope import apply_rope, rope_frequencies, rope_rotation

TEXT_DIM = 16


def tiny_config(**overrides) -> DiTConfig:
    """Two layers, width 32: the size every model check runs at."""
    return dit_preset("DiT-tiny", text_dim=TEXT_DIM, **overrides)


VARIANTS = {
    "full": tiny_config(),
    "windowed": tiny_config(temporal_windows=(2, 0)),
    "factorized": tiny_config(attention="factorized", temporal_windows=(2,)),
    "patch2x2x2": tiny_config(patch_size=(2, 2, 2)),
    "no-qk-norm": tiny_config(qk_norm=False),
    "absolute-positions": tiny_config(absolute_positions=True),
}


def perturbed(cfg: DiTConfig, seed: int = 0) -> DiT:
    """A model whose zero-initialised parts are made non-zero, so checks see every path."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def text(b: int, length: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.randn(b, length, TEXT_DIM)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, length - 2 :] = False
    return tokens, mask, torch.randn(b, TEXT_DIM)


# -- patching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 4, 4), (2, 1, 3)])
@pytest.mark.parametrize("thw", [(1, 8, 8), (4, 8, 12), (2, 4, 6), (8, 16, 4)])
def test_unpatchify_inverts_patchify(patch, thw):
    if any(s % p for s, p in zip(thw, patch)):
        with pytest.raises(ValueError, match="not divisible by the patch"):
            patchify(torch.zeros(1, 3, *thw), patch)
        return
    video = torch.randn(2, 3, *thw)
    tokens = patchify(video, patch)
    grid = patch_grid(thw, patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch, 3), video)


def test_patch_embed_conv_equals_linear_on_tokens():
    embed = PatchEmbed(3, 8, (2, 2, 2))
    video = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(video, (2, 2, 2))
    torch.testing.assert_close(embed(video), embed.embed_tokens(tokens), rtol=1e-5, atol=1e-5)


def test_patch_errors_are_clear():
    with pytest.raises(ValueError, match="clip height 7 is not divisible by the patch size 2"):
        patch_grid((4, 7, 8), (1, 2, 2))
    with pytest.raises(ValueError, match="do not match grid"):
        unpatchify(torch.zeros(1, 5, 12), (1, 2, 2), (1, 2, 2), 3)


# -- RoPE -------------------------------------------------------------------------------------


def test_rope_depends_only_on_relative_position():
    head_dim = 24
    freqs = rope_frequencies(head_dim)
    q = torch.randn(1, 1, 1, head_dim)  # (B, N, H, Dh)
    k = torch.randn(1, 1, 1, head_dim)

    def logit(pq, pk):
        return (
            apply_rope(q, rope_rotation(torch.tensor([pq]), freqs))
            * apply_rope(k, rope_rotation(torch.tensor([pk]), freqs))
        ).sum()

    base = logit((1, 2, 3), (4, 0, 5))
    shifted = logit((1 + 7, 2 + 11, 3 + 13), (4 + 7, 0 + 11, 5 + 13))
    torch.testing.assert_close(base, shifted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, logit((1, 2, 3), (5, 0, 5)))


def test_rope_keeps_norm_and_dtype():
    freqs = rope_frequencies(16)
    x = torch.randn(2, 6, 2, 16, dtype=torch.bfloat16)  # (B, N, H, Dh)
    out = apply_rope(x, rope_rotation(grid_positions((1, 2, 3)), freqs))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=2e-2)


def test_rope_rotates_stacked_queries_and_keys_alike():
    """(B, N, 2, H, Dh): queries and keys rotated in one call equal each rotated alone."""
    rotation = rope_rotation(grid_positions((2, 2, 3)), rope_frequencies(24))
    qk = torch.randn(3, 12, 2, 4, 24)
    both = apply_rope(qk, rotation)
    torch.testing.assert_close(both[:, :, 0], apply_rope(qk[:, :, 0], rotation))
    torch.testing.assert_close(both[:, :, 1], apply_rope(qk[:, :, 1], rotation))


def test_rope_real_form_equals_complex_form():
    """The (cos, sin) rotation compiled code uses equals the complex one eager code uses."""
    pos, freqs = grid_positions((3, 4, 5)), rope_frequencies(24)
    qk = torch.randn(2, 60, 2, 3, 24)
    torch.testing.assert_close(
        apply_rope(qk, rope_rotation(pos, freqs, real=True)), apply_rope(qk, rope_rotation(pos, freqs))
    )


def test_self_attention_qk_norm_uses_each_weight():
    """The fused QK-norm equals RMSNorm applied to queries and keys with their own weights."""
    from sora_model.attention import _qk_norm

    attn = SelfAttention(32, 2)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(-1.5, -0.5)
    qk = torch.randn(2, 7, 2, 2, 16)
    out = _qk_norm(qk, attn.q_norm, attn.k_norm)
    torch.testing.assert_close(out[:, :, 0], attn.q_norm(qk[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1], attn.k_norm(qk[:, :, 1]))


# -- attention --------------------------------------------------------------------------------


def test_windowed_attention_isolates_windows():
    """With window 2, tokens in frames 0-1 must not depend on frames 2-3."""
    torch.manual_seed(0)
    attn = SelfAttention(32, 2)
    grid = (4, 2, 2)
    pos = grid_positions(grid)[None]
    rope = rope_rotation(pos, rope_frequencies(16))
    x = torch.randn(1, 16, 32)
    y = x.clone()
    y[:, 8:] += 1.0  # change frames 2-3
    out_x = attn(x, rope, TokenLayout.dense(grid, 1), AttentionScope("full", 2))
    out_y = attn(y, rope, TokenLayout.dense(grid, 1), AttentionScope("full", 2))
    torch.testing.assert_close(out_x[:, :8], out_y[:, :8])
    assert not torch.allclose(out_x[:, 8:], out_y[:, 8:])


# -- the DiT: shared checks over variants ------------------------------------------------------


SHAPES = [(1, 8, 8), (2, 8, 8), (4, 8, 12), (4, 4, 16), (8, 8, 8)]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("thw", SHAPES)
def test_output_shape_matches_input(name, thw):
    cfg = VARIANTS[name]
    if thw[0] % cfg.patch_size[0]:
        pytest.skip("temporal patch does not divide this length")
    model = perturbed(cfg)
    x = torch.randn(2, 3, *thw)
    out = model(x, torch.tensor([10.0, 500.0]), *text(2))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_tokens_leave_valid_outputs_unchanged(name):
    cfg = VARIANTS[name]
    model = perturbed(cfg).eval()
    pt = cfg.patch_size[0]
    small, large = torch.randn(1, 3, 2 * pt, 4, 6), torch.randn(1, 3, 4 * pt, 8, 8)
    t = torch.tensor([300.0, 700.0])
    tt, tm, tp = text(2)
    alone = []
    for i, clip in enumerate([small, large]):
        grid = patch_grid(tuple(clip.shape[2:]), cfg.patch_size)
        alone.append(
            model.forward_tokens(
                patchify(clip, cfg.patch_size),
                t[i : i + 1],
                tt[i : i + 1],
                tm[i : i + 1],
                tp[i : i + 1],
                grid_positions(grid),
            )
        )
    # pad both into one batch
    n = max(a.shape[1] for a in alone)
    tokens = torch.zeros(2, n, cfg.patch_dim)
    positions = torch.zeros(2, n, 3, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for i, clip in enumerate([small, large]):
        grid = patch_grid(tuple(clip.shape[2:]), cfg.patch_size)
        k = alone[i].shape[1]
        tokens[i, :k] = patchify(clip, cfg.patch_size)[0]
        positions[i, :k] = grid_positions(grid)
        mask[i, :k] = True
    batched = model.forward_tokens(tokens, t, tt, tm, tp, positions, token_mask=mask)
    for i in range(2):
        k = alone[i].shape[1]
        torch.testing.assert_close(batched[i, :k], alone[i][0], rtol=1e-4, atol=1e-5)
        assert (batched[i, k:] == 0).all()


def test_absolute_positions_tell_places_apart():
    """A uniform clip makes every token identical. With RoPE alone attention then returns the same value
    everywhere, so every place gets the same output; absolute sin-cos positions make the places differ."""
    clip = torch.full((1, 3, 4, 8, 8), 0.3)
    t, (tt, tm, tp) = torch.tensor([400.0]), text(1)
    rope_only = patchify(perturbed(tiny_config()).eval()(clip, t, tt, tm, tp), (1, 2, 2))  # (1, N, P)
    torch.testing.assert_close(rope_only, rope_only[:, :1].expand_as(rope_only), rtol=1e-4, atol=1e-5)
    absolute = perturbed(tiny_config(absolute_positions=True)).eval()
    out = absolute(clip, t, tt, tm, tp)
    assert (out[:, :, 0] - out[:, :, -1]).abs().mean() > 1e-3  # first and last frame
    assert (out[..., 0] - out[..., -1]).abs().mean() > 1e-3  # left and right column
    # The token path adds the same embeddings as the video path.
    grid = patch_grid((4, 8, 8), absolute.cfg.patch_size)
    tokens = absolute.forward_tokens(patchify(clip, absolute.cfg.patch_size), t, tt, tm, tp, grid_positions(grid))
    torch.testing.assert_close(unpatchify(tokens, grid, absolute.cfg.patch_size, 3), out, rtol=1e-4, atol=1e-5)


def test_block_is_identity_at_init():
    cfg = tiny_config()
    block = DiT(cfg).blocks[0]
    assert isinstance(block, DiTBlock)
    x = torch.randn(2, 12, 32)
    pos = grid_positions((3, 2, 2))[None].expand(2, -1, -1)
    rope = rope_rotation(pos, rope_frequencies(16))
    ctx = torch.randn(2, 5, 32)
    out = block(x, torch.randn(2, 32), ctx, torch.ones(2, 5, dtype=torch.bool), rope, TokenLayout.dense((3, 2, 2), 2))
    torch.testing.assert_close(out, x)


def test_untrained_model_predicts_zero():
    model = DiT(tiny_config())
    out = model(torch.randn(1, 3, 2, 8, 8), torch.tensor([5.0]), *text(1))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["full", "windowed", "factorized"])
def test_gradient_checkpointing_gives_same_gradients(name):
    grads = []
    for ckpt in (False, True):
        model = perturbed(VARIANTS[name]).train()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(1)
        x = torch.randn(2, 3, 4, 8, 8)
        out = model(x, torch.tensor([1.0, 900.0]), *text(2))
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_condition_dropout_uses_null_condition():
    model = perturbed(tiny_config()).eval()
    x = torch.randn(2, 3, 2, 8, 8)
    t = torch.tensor([100.0, 100.0])
    tt, tm, tp = text(2)
    tt2, tm2, tp2 = text(2)
    drop = torch.tensor([True, True])
    a = model(x, t, tt, tm, tp, drop_text=drop)
    b = model(x, t, tt2, tm2, tp2, drop_text=drop)
    torch.testing.assert_close(a, b)  # the caption is ignored when dropped
    assert not torch.allclose(a, model(x, t, tt, tm, tp))


def test_runs_under_bf16_autocast():
    model = perturbed(VARIANTS["windowed"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 4, 8, 8), torch.tensor([3.0]), *text(1))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_resolution_and_length_never_seen():
    """RoPE has no table: a model runs at any grid."""
    model = perturbed(tiny_config())
    out = model(torch.randn(1, 3, 24, 6, 34), torch.tensor([3.0]), *text(1))
    assert out.shape == (1, 3, 24, 6, 34)


def test_save_load_state_dict_is_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    model = perturbed(tiny_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = DiT(tiny_config())
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(1, 3, 2, 8, 8)
    args = (torch.tensor([7.0]), *text(1))
    torch.testing.assert_close(model(x, *args), fresh(x, *args), rtol=0, atol=0)


def test_bad_input_shapes_are_clear():
    model = DiT(tiny_config())
    with pytest.raises(ValueError, match=r"expects \(B, 3, T, H, W\)"):
        model(torch.randn(1, 4, 2, 8, 8), torch.tensor([1.0]), *text(1))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(torch.randn(1, 3, 2, 7, 8), torch.tensor([1.0]), *text(1))
    with pytest.raises(ValueError, match="model.text_dim=16"):
        model(
            torch.randn(1, 3, 2, 8, 8),
            torch.tensor([1.0]),
            torch.randn(1, 5, 8),
            torch.ones(1, 5, dtype=torch.bool),
            torch.randn(1, 8),
        )


# -- configs ----------------------------------------------------------------------------------


def test_presets_build_and_have_expected_sizes():
    for name in ("DiT-S/2", "DiT-S/2x2", "DiT-B/2", "DiT-L/2x2", "DiT-XL/2"):
        cfg = dit_preset(name)
        assert cfg.patch_size in ((1, 2, 2), (2, 2, 2))
    assert 0.2e6 < DiT(dit_preset("DiT-demo")).num_parameters() < 5e6
    with pytest.raises(ConfigError, match="unknown model preset 'DiT-Q'"):
        dit_preset("DiT-Q")


def test_config_round_trip_and_strict_keys():
    cfg = PipelineConfig(model=tiny_config())
    assert from_dict(PipelineConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden_size'"):
        from_dict(PipelineConfig, {"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match=r"diffusion.schedule must be one of"):
        from_dict(PipelineConfig, {"diffusion": {"schedule": "cosine"}})
    with pytest.raises(ConfigError, match=r"model.depth must be an integer"):
        from_dict(PipelineConfig, {"model": {"depth": "two"}})
    with pytest.raises(ConfigError, match="divisible by model.num_heads"):
        from_dict(PipelineConfig, {"model": {"hidden_size": 30, "num_heads": 4}})
    with pytest.raises(ConfigError, match="prediction must be 'velocity' for rectified_flow"):
        from_dict(PipelineConfig, {"diffusion": {"prediction": "eps"}})
    with pytest.raises(ConfigError, match="loss.perceptual_network is not set"):
        from_dict(LossConfig, {"perceptual": 0.2})


# -- precision --------------------------------------------------------------------------------


def test_conditioning_and_residual_stay_fp32_under_bf16_autocast():
    """Timestep embedding, adaLN modulation and the gated residual stream in fp32 (the GPU anchors' rule)."""
    model = perturbed(VARIANTS["windowed"])
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left as it is

        return hook

    model.t_embedder.register_forward_hook(record("timestep"))
    model.blocks[0].adaLN_modulation.register_forward_hook(record("adaLN"))
    model.blocks[0].register_forward_hook(record("residual"))
    model.blocks[0].attn.qkv.register_forward_hook(record("qkv"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 4, 8, 8), torch.tensor([3.0]), *text(1))
    assert seen == {"timestep": torch.float32, "adaLN": torch.float32, "residual": torch.float32, "qkv": torch.bfloat16}


def test_bf16_inference_weights_halve_memory_and_match_fp32():
    model = perturbed(VARIANTS["windowed"]).eval()
    x, args = torch.randn(2, 3, 5, 8, 8), (torch.tensor([3.0, 600.0]), *text(2))
    with torch.no_grad():
        ref = model(x, *args)
        fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.to_inference_dtype(torch.bfloat16)
        out = model(x, *args)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.t_embedder.mlp[0].weight.dtype == torch.float32
    assert bf16_bytes < 0.6 * fp32_bytes  # the fp32 embedders are a small share at real widths, larger here
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
