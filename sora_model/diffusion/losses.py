"""Training loss terms (article 4.1) and the perceptual feature network.

The diffusion term is an MSE on the network's prediction target. The auxiliary terms compare the
implied clean clip x0_hat with the true x0:

- temporal consistency: frame-to-frame differences x[t+1] - x[t] (article weight 0.1);
- motion smoothness: second-order differences x[t+2] - 2 x[t+1] + x[t], i.e. acceleration (0.05);
- perceptual: distances between feature-network activations per frame, in pixel space (0.2).

Each auxiliary term is computed per sample and averaged with a per-sample weight that the schedule
chooses (`aux_weight`): DDPM's x0_hat is ill-conditioned at high noise, flow's is not.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sora_model.config import LossConfig

LOSS_KEYS: tuple[str, ...] = ("loss", "diffusion", "temporal_consistency", "motion_smoothness", "perceptual")
"""Keys of the dict `training_losses` returns; trainers log all of them."""
PIXEL_CHANNELS = 3
"""The perceptual network sees RGB frames."""

Decoder = Callable[[Tensor], Tensor]
"""Model space (B, C, T, H, W) -> pixels in [-1, 1] (B, 3, T, H, W)."""


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all but the batch dimension: (B, ...) -> (B,)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)  # (B,)


def temporal_consistency_loss(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """(B,) MSE between first temporal differences of x0_hat and x0; zero when T < 2 (images)."""
    if x0.shape[2] < 2:
        return x0.new_zeros(x0.shape[0])
    d_hat = x0_hat[:, :, 1:] - x0_hat[:, :, :-1]  # (B, C, T-1, H, W)
    d_ref = x0[:, :, 1:] - x0[:, :, :-1]  # (B, C, T-1, H, W)
    return _per_sample_mse(d_hat, d_ref)


def motion_smoothness_loss(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """(B,) MSE between second temporal differences of x0_hat and x0; zero when T < 3."""
    if x0.shape[2] < 3:
        return x0.new_zeros(x0.shape[0])
    a_hat = x0_hat[:, :, 2:] - 2 * x0_hat[:, :, 1:-1] + x0_hat[:, :, :-2]  # (B, C, T-2, H, W)
    a_ref = x0[:, :, 2:] - 2 * x0[:, :, 1:-1] + x0[:, :, :-2]  # (B, C, T-2, H, W)
    return _per_sample_mse(a_hat, a_ref)


def _frames(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) -> (B*T, 3, H, W), the layout an image feature network takes."""
    if video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
        raise ValueError(
            f"the perceptual loss needs decoded RGB clips (B, 3, T, H, W), got shape {tuple(video.shape)}; "
            "pass `decode` when the model space is not pixels"
        )
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 3, H, W)


def perceptual_loss(x0_hat: Tensor, x0: Tensor, net: nn.Module, decode: Decoder | None = None) -> Tensor:
    """(B,) feature-space MSE per frame, averaged over each clip's frames.

    Both clips are decoded to pixels and fed frame by frame; the target's features need no gradient.
    Nothing is clamped: gradients must reach x0_hat even where it leaves [-1, 1].
    """
    decode = decode if decode is not None else (lambda x: x)
    b, t = x0.shape[0], x0.shape[2]
    with torch.no_grad():
        feat_ref = net(_frames(decode(x0)))  # (B*T, ...)
    feat_hat = net(_frames(decode(x0_hat)))  # (B*T, ...)
    return _per_sample_mse(feat_hat, feat_ref).view(b, t).mean(dim=1)  # (B,)


def combine_losses(
    pred: Tensor,
    target: Tensor,
    x0_hat: Tensor,
    x0: Tensor,
    aux_weight: Tensor,
    loss_cfg: LossConfig,
    *,
    perceptual_net: nn.Module | None = None,
    decode: Decoder | None = None,
) -> dict[str, Tensor]:
    """All terms and their weighted total.

    pred, target: (B, C, T, H, W) network output and its regression target. x0_hat, x0: implied and
    true clean clips. aux_weight: (B,) per-sample factor on the auxiliary terms. Terms whose weight is 0
    are skipped (reported as 0). Returns scalars under `LOSS_KEYS`; only "loss" carries the graph, the
    reported terms are detached for logging.
    """
    if loss_cfg.perceptual > 0 and perceptual_net is None:
        raise ValueError(
            f"loss.perceptual is {loss_cfg.perceptual} but no perceptual network was given; set "
            "loss.perceptual_network to a local TorchScript file and pass load_perceptual_network(path), "
            "or set loss.perceptual to 0"
        )
    zero = x0.new_zeros(())
    terms: dict[str, Tensor] = {"diffusion": (pred.float() - target.float()).pow(2).mean()}
    aux: dict[str, Callable[[], Tensor]] = {
        "temporal_consistency": lambda: temporal_consistency_loss(x0_hat, x0),
        "motion_smoothness": lambda: motion_smoothness_loss(x0_hat, x0),
        "perceptual": lambda: perceptual_loss(x0_hat, x0, perceptual_net, decode),  # type: ignore[arg-type]
    }
    for name, compute in aux.items():
        # Skipping zero-weight terms saves a feature-network pass (perceptual) or two extra clip-sized tensors.
        terms[name] = (aux_weight * compute().float()).mean() if getattr(loss_cfg, name) > 0 else zero
    total = sum(getattr(loss_cfg, name) * value for name, value in terms.items())
    out = {"loss": total}
    out.update({name: value.detach() for name, value in terms.items()})
    return out  # type: ignore[return-value]


def load_perceptual_network(path: str) -> nn.Module:
    """A TorchScript feature network from a local file, on CPU, in eval mode, with frozen weights.

    It takes (N, 3, H, W) frames in [-1, 1] and returns any feature tensor (N, ...). Move it to the
    training device yourself. Frozen: the loss trains the DiT, never the judge.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"perceptual network not found at '{path}' (set loss.perceptual_network to a local TorchScript file)"
        )
    with warnings.catch_warnings():
        # TorchScript is deprecated in recent torch, but it is the one format that loads without unpickling code.
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(path, map_location="cpu")
    net.eval()
    for param in net.parameters():  # ScriptModules refuse requires_grad_(); per parameter works
        param.requires_grad_(False)
    return net
