"""The near-duplicate index of `sora data filter` against brute force, and its option checks (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.filter import FilterError, FilterOptions, near_duplicates
from pipelines.data.prepare.curate import HASH_FRAMES, hamming, scene_of, spanned_cut


def _brute(hashes: np.ndarray, n: int) -> np.ndarray:
    of = np.full(len(hashes), -1)
    kept: list[int] = []
    for i, h in enumerate(hashes):
        j = next((j for j in kept if int(hamming(h, hashes[j]).max()) <= n), None)
        if j is None:
            kept.append(i)
        else:
            of[i] = j
    return of


@pytest.mark.parametrize("max_hamming", [0, 3, 7])
def test_band_index_finds_what_brute_force_finds(max_hamming):
    rng = np.random.default_rng(max_hamming)
    base = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=(60, HASH_FRAMES), dtype=np.int64)
    near = []
    for _ in range(140):  # copies of random clips: each frame's hash within max_hamming bits, or one frame beyond it
        h = base[rng.integers(len(base))].copy().view(np.uint64)
        flips = rng.integers(0, max_hamming + 1, size=HASH_FRAMES)
        if rng.random() < 0.4:
            flips[rng.integers(HASH_FRAMES)] = max_hamming + 1 + rng.integers(0, 3)
        for f in range(HASH_FRAMES):
            for bit in rng.choice(64, size=int(flips[f]), replace=False):
                h[f] ^= np.uint64(1) << np.uint64(int(bit))
        near.append(h.view(np.int64))
    hashes = np.concatenate([base, np.stack(near)])[rng.permutation(200)]
    got = near_duplicates(hashes, max_hamming)
    np.testing.assert_array_equal(got, _brute(hashes, max_hamming))
    assert (got >= 0).sum() > 20 and (got < 0).sum() > 50  # both kinds occur


def test_cut_helpers():
    assert spanned_cut([12, 30], [4, 5, 6, 7, 8, 9, 10, 11]) is None
    assert spanned_cut([12, 30], [8, 9, 10, 11, 12, 13, 14, 15]) == 12
    assert spanned_cut([12, 30], [12, 13, 14, 15]) is None  # starting at the cut is inside the new scene
    assert [scene_of([12, 30], f) for f in (0, 11, 12, 29, 30)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to filter"),
        ({"min_motion": -1.0}, "--min-motion must be >= 0"),
        ({"drop_duplicates": True, "max_hamming": 64}, r"--max-hamming must be in \[0, 63\]"),
        ({"min_motion": 1.0, "out": "in/"}, "--out must differ from --in"),
    ],
)
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(FilterError, match=message):
        FilterOptions(**{"src": "in", "out": "out", **kwargs})
