"""Autoencoders: identity round trip, tiny random diffusers VAEs (2D per frame and 3D video) from folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sora_model.autoencoder import (
    DiffusersAutoencoder,
    IdentityAutoencoder,
    build_autoencoder,
    model_to_pixels,
    pixels_to_model,
)
from sora_model.config import AutoencoderConfig

diffusers = pytest.importorskip("diffusers")


def _video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


def _save(model: torch.nn.Module, folder: Path) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
    )
    return _save(vae, tmp_path_factory.mktemp("kl"))


def _check_round_trip(ae: DiffusersAutoencoder, frames: int, size: int) -> None:
    """Shared check: shapes follow latent_shape, encode is deterministic, decode restores the clip's shape."""
    video = _video(2, frames, size, size)
    t, h, w = ae.latent_shape(frames, size, size)
    z = ae.encode(video)
    assert z.shape == (2, ae.latent_channels, t, h, w) and z.dtype == torch.float32
    torch.testing.assert_close(ae.encode(video), z)  # posterior mean, no sampling
    out = ae.decode(z)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert ae.frames_for_latent(t) == frames


# --- pixels <-> model space ------------------------------------------------------------------


def test_pixel_conversion_round_trip() -> None:
    frames = torch.randint(0, 256, (2, 3, 4, 5, 3), dtype=torch.uint8)  # (B, T, H, W, 3)
    video = pixels_to_model(frames)
    assert video.shape == (2, 3, 3, 4, 5) and video.min() >= -1 and video.max() <= 1
    torch.testing.assert_close(model_to_pixels(video), frames, rtol=0, atol=0)
    clipped = model_to_pixels(torch.full((1, 3, 1, 2, 2), 3.0))
    assert clipped.dtype == torch.uint8 and int(clipped.max()) == 255
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_model(frames.float())
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model_to_pixels(video[0])


def test_identity_round_trip_exact() -> None:
    ae = build_autoencoder(AutoencoderConfig())
    assert isinstance(ae, IdentityAutoencoder)
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (3, 1, 1)
    video = _video(1, 5, 7, 9)
    assert torch.equal(ae.decode(ae.encode(video)), video)
    assert ae.latent_shape(5, 7, 9) == (5, 7, 9)


# --- 2D VAE, per frame -----------------------------------------------------------------------


def test_autoencoder_kl_per_frame(kl_dir: str) -> None:
    ae = build_autoencoder(AutoencoderConfig(kind="diffusers", path=kl_dir))
    assert isinstance(ae, DiffusersAutoencoder)
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (4, 2, 1)
    _check_round_trip(ae, frames=3, size=16)
    assert ae.latent_shape(8, 32, 32) == (8, 16, 16)
    with pytest.raises(ValueError, match="multiples of 2"):
        ae.latent_shape(8, 31, 32)


def test_kl_frames_are_independent(kl_dir: str) -> None:
    """Folding T into the batch must give each frame exactly its own image latents."""
    ae = DiffusersAutoencoder(kl_dir)
    video = _video(1, 3, 8, 8)
    z = ae.encode(video)
    single = ae.encode(video[:, :, 1:2])
    torch.testing.assert_close(z[:, :, 1:2], single)


def test_scaling_factor_from_vae_config_and_override(kl_dir: str) -> None:
    assert json.loads((Path(kl_dir) / "config.json").read_text())["scaling_factor"] == 0.5
    own = DiffusersAutoencoder(kl_dir)
    assert (own.scaling_factor, own.shift_factor) == (0.5, 0.0)
    raw = own.vae.encode(_video(1, 1, 8, 8)[:, :, 0]).latent_dist.mean  # (1, 4, 4, 4)
    torch.testing.assert_close(own.encode(_video(1, 1, 8, 8))[:, :, 0], raw * 0.5)
    overridden = build_autoencoder(
        AutoencoderConfig(kind="diffusers", path=kl_dir, scaling_factor=2.0, shift_factor=0.1)
    )
    torch.testing.assert_close(overridden.encode(_video(1, 1, 8, 8))[:, :, 0], (raw - 0.1) * 2.0)
    z = overridden.encode(_video(1, 2, 8, 8))
    # decode inverts the normalisation exactly: same as the raw VAE on the raw posterior mean
    raw2 = overridden.vae.decode(z[:, :, 0] / 2.0 + 0.1).sample
    torch.testing.assert_close(overridden.decode(z)[:, :, 0], raw2)


# --- 3D video VAEs ---------------------------------------------------------------------------


def test_cogvideox_video_vae(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    ae = build_autoencoder(AutoencoderConfig(kind="diffusers", path=_save(vae, tmp_path / "cog")))
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (4, 4, 4)
    assert ae.scaling_factor == pytest.approx(vae.config.scaling_factor)  # the VAE's own, not 0.18215
    _check_round_trip(ae, frames=9, size=16)
    assert ae.latent_shape(1, 16, 16) == (1, 4, 4)  # images are 1-frame clips
    with pytest.raises(ValueError, match="1 \\+ a multiple of 8"):
        ae.latent_shape(5, 16, 16)  # CogVideoX needs an odd latent frame count
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        ae.latent_shape(8, 16, 16)


def test_wan_video_vae_with_channel_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5]
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=mean,
        latents_std=std,
    )
    ae = DiffusersAutoencoder(_save(vae, tmp_path / "wan"))
    assert ae.vae.use_tiling  # long clips decode tile by tile; this 16 px clip is below the tile size
    assert not DiffusersAutoencoder(str(tmp_path / "wan"), tiling=False).vae.use_tiling
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (4, 8, 4)
    _check_round_trip(ae, frames=5, size=16)
    video = _video(1, 5, 16, 16)
    raw = ae.vae.encode(video).latent_dist.mean
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(ae.encode(video), expected)


def _tiny_hunyuan() -> torch.nn.Module:
    return diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 16),
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )


def _tiny_ltx() -> torch.nn.Module:
    return diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        patch_size=1,
        patch_size_t=1,
    )


@pytest.mark.parametrize("make,factors", [(_tiny_hunyuan, (4, 4)), (_tiny_ltx, (4, 4))], ids=["hunyuan", "ltx"])
def test_other_video_vaes(tmp_path: Path, make, factors: tuple[int, int]) -> None:
    torch.manual_seed(0)
    ae = DiffusersAutoencoder(_save(make(), tmp_path / "vae"))
    assert (ae.spatial_factor, ae.temporal_factor) == factors
    _check_round_trip(ae, frames=5, size=16)


# --- errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vae"
    with pytest.raises(FileNotFoundError, match=f"autoencoder.path '{missing}' not found"):
        build_autoencoder(AutoencoderConfig(kind="diffusers", path=str(missing)))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_autoencoder(AutoencoderConfig(kind="diffusers", path=str(tmp_path)))


def test_unsupported_class_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel, which is not supported; supported: AutoencoderKL, "):
        build_autoencoder(AutoencoderConfig(kind="diffusers", path=str(tmp_path)))
