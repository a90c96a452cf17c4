"""The VAE-encode batch follows the device's memory (like the decode batch follows the node's): clips per
autoencoder call from the GPU's free memory and a per-clip estimate, `--vae-batch-clips` over both, CPU as before."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.prepare import encode
from pipelines.data.prepare.encode import (
    VAE_BATCH_BYTES,
    VAE_DEVICE_FRACTION,
    VAE_PEAK_BYTES_PER_VALUE,
    vae_batch_clips,
)
from pipelines.data.prepare.options import PrepareError, PrepareOptions, parse_buckets

GIB = 2**30
SMALL, LARGE = (17, 256, 256, 3), (33, 480, 832, 3)


def test_gpu_batch_follows_free_memory_and_fits_it():
    # An H100 (79 GiB free once the weights are in) at 17x256x256: fewer clips than the 160 that peaked at 76 GiB.
    h100 = vae_batch_clips(SMALL, 79 * GIB)
    assert h100 == int(79 * GIB * VAE_DEVICE_FRACTION) // (int(np.prod(SMALL)) * VAE_PEAK_BYTES_PER_VALUE) == 134
    assert h100 * int(np.prod(SMALL)) * 153 < 79 * GIB  # at the measured 153 B per value the batch fits
    h200 = vae_batch_clips(SMALL, 139 * GIB)
    assert h100 < h200 < 2 * h100 and vae_batch_clips(SMALL, 40 * GIB) == pytest.approx(h100 / 2, abs=1)
    assert vae_batch_clips(LARGE, 79 * GIB) == 11  # 13 clips peaked at 9.6 GiB: the estimate errs on the safe side
    assert vae_batch_clips((81, 1080, 1920, 3), 16 * GIB) == 1  # never zero
    # The old fixed budget ignored the device: 160 clips at 17x256x256 on any GPU, 80 GB or 24 GB.
    assert VAE_BATCH_BYTES // (int(np.prod(SMALL)) * 4) == 160 and vae_batch_clips(SMALL, 22 * GIB) == 37


def test_cpu_is_unchanged_and_the_override_wins():
    for shape in (SMALL, LARGE, (4, 16, 16, 3)):
        assert vae_batch_clips(shape, None) == max(1, VAE_BATCH_BYTES // (int(np.prod(shape)) * 4))
        assert vae_batch_clips(shape, None, override=7) == vae_batch_clips(shape, 79 * GIB, override=7) == 7
    from sora_model.config import AutoencoderConfig

    patchify = encode.Patchify(AutoencoderConfig(), (1, 4, 4))  # the CPU here: no device memory to read
    assert patchify.free_device_bytes is None and patchify.rows_per_call((5, *SMALL)) == 160
    assert encode.Patchify(AutoencoderConfig(), (1, 4, 4), batch_clips=3).rows_per_call((5, *SMALL)) == 3


def test_the_override_is_checked_and_reaches_the_options(tmp_path):
    with pytest.raises(PrepareError, match="--vae-batch-clips must be >= 1, got 0"):
        PrepareOptions(manifest="m.jsonl", out=str(tmp_path), buckets=parse_buckets("8x32x32"), vae_batch_clips=0)
    import argparse

    from pipelines.data.commands import add_prepare_arguments
    from pipelines.data.prepare.args import options_from_args

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(
        ["--manifest", "m.jsonl", "--out", str(tmp_path), "--buckets", "8x32x32", "--vae-batch-clips", "12"]
    )
    assert options_from_args(args).vae_batch_clips == 12


def test_an_out_of_memory_call_is_halved_and_remembered(monkeypatch):
    """When the estimate is short for some VAE, CUDA's out-of-memory error halves the call (kept for the shape)
    instead of failing the actor: the device's refusal is injected into a real autoencoder call here."""
    import torch

    from sora_model.config import AutoencoderConfig

    patchify = encode.Patchify(AutoencoderConfig(), (1, 4, 4), batch_clips=8)
    real, calls = patchify.autoencoder.encode, []

    def encode_within_three(x):
        calls.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x)

    monkeypatch.setattr(patchify.autoencoder, "encode", encode_within_three)
    pixels = np.random.default_rng(0).integers(0, 255, (7, 4, 16, 16, 3), dtype=np.uint8)
    tokens, _ = patchify(pixels)
    assert calls == [7, 3, 3, 1] and patchify.oom_cap[(4, 16, 16, 3)] == 3
    np.testing.assert_array_equal(tokens, encode.Patchify(AutoencoderConfig(), (1, 4, 4))(pixels)[0])
    calls.clear()
    patchify(pixels)
    assert calls == [3, 3, 1]  # the next batch starts at the size that fitted
    monkeypatch.setattr(
        patchify.autoencoder, "encode", lambda x: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("no"))
    )
    with pytest.raises(torch.cuda.OutOfMemoryError):
        patchify(pixels[:1])  # one clip that does not fit is the run's error, not a loop
