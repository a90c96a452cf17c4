"""Training losses: keys, finiteness, gradients, the auxiliary terms' zeros, and the perceptual network."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from sora_model.config import DiffusionConfig, LossConfig
from sora_model.diffusion import (
    FLOW_TIMESTEP_SCALE,
    LOSS_KEYS,
    GaussianDiffusion,
    build_diffusion,
    combine_losses,
    load_perceptual_network,
    motion_smoothness_loss,
    perceptual_loss,
    temporal_consistency_loss,
)

CONFIGS = {
    "flow": DiffusionConfig(schedule="rectified_flow", prediction="velocity", sampler="euler"),
    "ddpm-eps": DiffusionConfig(schedule="ddpm_linear", prediction="eps", sampler="ddpm"),
    "ddpm-v": DiffusionConfig(schedule="ddpm_linear", prediction="v", sampler="ddim"),
    "adaptive": DiffusionConfig(schedule="adaptive", prediction="eps", sampler="ddpm"),
}
ALL_ON = LossConfig(diffusion=1.0, temporal_consistency=0.1, motion_smoothness=0.05)


def clip(t: int = 4, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, c, t, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, C, T, H, W)


class TinyNet(nn.Module):
    """Stands in for the DiT: a Conv3d plus a timestep bias, so the timestep path is exercised too."""

    def __init__(self, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.t_scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.t_scale * (t / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1, 1)


def save_feature_net(path: Path) -> str:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))
    return str(path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_losses_keys_finite_and_gradients(name):
    diff = build_diffusion(CONFIGS[name])
    net = TinyNet()
    out = diff.training_losses(net, clip(), ALL_ON, generator=torch.Generator().manual_seed(0), num_tokens=64)
    assert set(out) == set(LOSS_KEYS)
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), key
    assert out["temporal_consistency"] > 0 and out["motion_smoothness"] > 0
    assert out["perceptual"] == 0  # weight 0: not computed
    expected = out["diffusion"] + 0.1 * out["temporal_consistency"] + 0.05 * out["motion_smoothness"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_losses_deterministic_per_seed(name):
    diff = build_diffusion(CONFIGS[name])
    net = TinyNet()
    runs = [
        diff.training_losses(net, clip(), ALL_ON, generator=torch.Generator().manual_seed(s))["loss"].item()
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ideal_model_gives_zero_loss(name):
    """For a single data clip the ideal prediction is known in closed form: every term must vanish,
    which checks that targets, timesteps fed to the model and x0_hat all agree."""
    diff = build_diffusion(CONFIGS[name])
    x0 = clip()

    def oracle(x_t, timestep):
        if isinstance(diff, GaussianDiffusion):
            ab = diff.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1, 1).float()
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
            return eps if diff.cfg.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        t = (timestep / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1, 1)
        return (x_t - x0) / t

    out = diff.training_losses(oracle, x0, ALL_ON, generator=torch.Generator().manual_seed(0))
    for key in ("loss", "diffusion", "temporal_consistency", "motion_smoothness"):
        assert out[key].item() < 1e-6, key


def test_temporal_and_motion_terms():
    x0 = clip(t=5)
    assert torch.all(temporal_consistency_loss(x0, x0) == 0)
    assert torch.all(motion_smoothness_loss(x0, x0) == 0)
    # a constant offset leaves differences unchanged: both terms stay 0
    assert torch.allclose(temporal_consistency_loss(x0 + 0.5, x0), torch.zeros(2), atol=1e-6)
    noisy = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.all(temporal_consistency_loss(noisy, x0) > 0)
    assert torch.all(motion_smoothness_loss(noisy, x0) > 0)
    # a linear drift in time changes velocity but not acceleration
    ramp = torch.arange(5.0).view(1, 1, 5, 1, 1)
    assert torch.all(temporal_consistency_loss(x0 + 0.1 * ramp, x0) > 0)
    assert torch.allclose(motion_smoothness_loss(x0 + 0.1 * ramp, x0), torch.zeros(2), atol=1e-6)
    # too short: zero, no error
    assert torch.all(temporal_consistency_loss(noisy[:, :, :1], x0[:, :, :1]) == 0)
    assert torch.all(motion_smoothness_loss(noisy[:, :, :2], x0[:, :, :2]) == 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_images_give_zero_aux_terms(name):
    diff = build_diffusion(CONFIGS[name])
    net = TinyNet()
    out = diff.training_losses(net, clip(t=1), ALL_ON, generator=torch.Generator().manual_seed(0))
    assert out["temporal_consistency"] == 0 and out["motion_smoothness"] == 0
    assert out["loss"].item() == pytest.approx(out["diffusion"].item())
    out["loss"].backward()
    assert net.conv.weight.grad is not None
    two = diff.training_losses(net, clip(t=2), ALL_ON, generator=torch.Generator().manual_seed(0))
    assert two["temporal_consistency"] > 0 and two["motion_smoothness"] == 0


def test_zero_weights_skip_terms():
    diff = build_diffusion(CONFIGS["flow"])
    cfg = LossConfig(temporal_consistency=0.0, motion_smoothness=0.0)
    out = diff.training_losses(TinyNet(), clip(), cfg, generator=torch.Generator().manual_seed(0))
    assert out["temporal_consistency"] == 0 and out["motion_smoothness"] == 0
    assert out["loss"].item() == pytest.approx(out["diffusion"].item())


def test_ddpm_aux_weight_is_conditioning_aware():
    eps = build_diffusion(CONFIGS["ddpm-eps"])
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(eps.aux_weight(t), eps.alphas_cumprod[t].float())
    assert eps.aux_weight(t)[-1] < 1e-3  # x0_hat from eps at pure noise barely counts
    v = build_diffusion(CONFIGS["ddpm-v"])
    assert torch.equal(v.aux_weight(t), torch.ones(3))
    flow = build_diffusion(CONFIGS["flow"])
    assert torch.equal(flow.aux_weight(torch.tensor([0.1, 0.9])), torch.ones(2))


def test_perceptual_weight_without_network_raises():
    diff = build_diffusion(CONFIGS["flow"])
    cfg = LossConfig(perceptual=0.2, perceptual_network="features.pt")
    with pytest.raises(ValueError, match="loss.perceptual is 0.2 but no perceptual network was given"):
        diff.training_losses(TinyNet(), clip(), cfg, generator=torch.Generator().manual_seed(0))


def test_load_perceptual_network(tmp_path):
    path = save_feature_net(tmp_path / "features.pt")
    net = load_perceptual_network(path)
    assert isinstance(net, nn.Module) and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 4, 3, 3)

    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="loss.perceptual_network") as err:
        load_perceptual_network(missing)
    assert missing in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["flow", "ddpm-eps"])
def test_perceptual_term_trains_the_model_not_the_judge(tmp_path, name):
    feat = load_perceptual_network(save_feature_net(tmp_path / "features.pt"))
    diff = build_diffusion(CONFIGS[name])
    net = TinyNet()
    cfg = LossConfig(perceptual=0.2, perceptual_network=str(tmp_path / "features.pt"))
    out = diff.training_losses(net, clip(), cfg, generator=torch.Generator().manual_seed(0), perceptual_net=feat)
    assert out["perceptual"] > 0 and torch.isfinite(out["perceptual"])
    out["loss"].backward()
    assert net.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in feat.parameters())
    x0 = clip()
    assert torch.all(perceptual_loss(x0, x0, feat) == 0)


def test_perceptual_decodes_latents(tmp_path):
    """With a 4-channel model space, `decode` maps to RGB first; without it the shape error is clear."""
    feat = load_perceptual_network(save_feature_net(tmp_path / "features.pt"))
    to_rgb = nn.Conv3d(4, 3, kernel_size=1)
    x0 = clip(c=4)
    hat = x0 + 0.1
    value = perceptual_loss(hat, x0, feat, decode=lambda z: torch.tanh(to_rgb(z)))
    assert value.shape == (2,) and torch.all(value > 0)
    with pytest.raises(ValueError, match="pass `decode`"):
        perceptual_loss(hat, x0, feat)


def test_combine_losses_weights_per_sample():
    x0 = clip(t=3)
    hat = x0.clone()
    hat[1] += torch.randn(hat[1].shape, generator=torch.Generator().manual_seed(0))
    pred = torch.zeros_like(x0)
    cfg = LossConfig(diffusion=0.0, temporal_consistency=1.0, motion_smoothness=0.0)
    both = combine_losses(pred, pred, hat, x0, torch.ones(2), cfg)
    only_clean = combine_losses(pred, pred, hat, x0, torch.tensor([1.0, 0.0]), cfg)
    assert both["loss"] > 0 and only_clean["loss"] == 0
    half = combine_losses(pred, pred, hat, x0, torch.tensor([1.0, 0.5]), cfg)
    assert math.isclose(half["loss"].item(), 0.5 * both["loss"].item(), rel_tol=1e-5)
