"""Clip metrics with no learned weights: temporal consistency, frame change, diversity across seeds, Fréchet
distance.

Clips come as uint8 and are mapped to [-1, 1] (the model's space), so a black background is not a zero vector and a
cosine similarity between frames is not inflated by both being mostly zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _to_unit(clips: np.ndarray) -> np.ndarray:
    return np.asarray(clips, dtype=np.float64) / 127.5 - 1.0


def temporal_consistency(clip: np.ndarray) -> float:
    """Mean cosine similarity of consecutive frames of one (T, H, W, 3) uint8 clip, in [-1, 1].

    1 for a static clip; ~0 for independent noise; a smoothly moving shape stays close to 1.
    A one-frame clip is trivially consistent (1).
    """
    x = _to_unit(clip).reshape(len(clip), -1)  # (T, H*W*3)
    if len(x) < 2:
        return 1.0
    a, b = x[:-1], x[1:]
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-12), 1.0)
    return float(cos.mean())


def frame_change(clip: np.ndarray) -> float:
    """Mean RMS change between consecutive frames, in [0, 2] units of the [-1, 1] range (0 = static)."""
    x = _to_unit(clip)
    if len(x) < 2:
        return 0.0
    return float(np.sqrt(((x[1:] - x[:-1]) ** 2).mean(axis=(1, 2, 3))).mean())


def diversity(clips: np.ndarray) -> float:
    """Mean pairwise RMS distance between clips of one prompt (different seeds), (S, T, H, W, 3) uint8.

    0 when every seed gives the same clip; in [0, 2] units of the [-1, 1] range. Needs S >= 2.
    """
    x = _to_unit(clips).reshape(len(clips), -1)  # (S, N)
    if len(x) < 2:
        raise ValueError(f"diversity needs at least 2 clips of the same prompt, got {len(x)}")
    i, j = np.triu_indices(len(x), k=1)
    return float(np.sqrt(((x[i] - x[j]) ** 2).mean(axis=1)).mean())


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    The trace term uses symmetric eigendecompositions, which stay real and exact for the
    rank-deficient covariances few samples give (where `scipy.linalg.sqrtm(S1 @ S2)`, the usual FID
    code, needs an epsilon and can return a complex result); both agree on full-rank inputs.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(value, 0.0)  # round-off can leave -1e-12 for identical sets


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def mean_over(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None
