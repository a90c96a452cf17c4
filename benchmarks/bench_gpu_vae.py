"""GPU figure for long-clip decoding (issue 14, item 5): a Wan2.1-shaped video VAE decoding 33 and 81 frames at
480x832 in bf16, tiled and untiled: peak memory and seconds.

    python -m benchmarks.bench_gpu_vae [--json PATH]

The VAE is diffusers' `AutoencoderKLWan` with its default (Wan2.1) configuration and random weights (decode
cost does not depend on their values), saved with `save_pretrained` and loaded through our
`DiffusersAutoencoder`, as generation loads it: `autoencoder.tiling: true` (the default) decodes in
overlapping spatial tiles, false decodes whole frames. Latents are 16 x T' x 60 x 104 with T' = 9 (33 frames)
and 21 (81 frames). A decode that runs out of memory is recorded as such. Needs diffusers (carried as a
wheel to GPU machines that lack it). Exits 0 with a message where there is no CUDA device.
"""

from __future__ import annotations

import sys
import tempfile

from benchmarks.common import main

FIGURE = "gpu_vae_decode"
GOAL = (">=", 0.0)  # descriptive
LATENT_FRAMES = {33: 9, 81: 21}


def run(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_vae: no CUDA device here; not measured (run this on a GPU machine)", file=sys.stderr)
        return {"value": None, "compared": "VAE decode memory: not measured (no GPU)", "details": {"cuda": False}}
    from diffusers import AutoencoderKLWan

    folder = tempfile.mkdtemp(prefix="wan-vae-")
    AutoencoderKLWan().save_pretrained(folder)
    details: dict = {
        "device": torch.cuda.get_device_name(0),
        "vae": "AutoencoderKLWan default config, random weights, bf16",
    }
    for tiling in (True, False):
        details.update(_decode_figures(folder, tiling))
        torch.cuda.empty_cache()
    tiled, untiled = details.get("tiled_81f_peak_gib"), details.get("untiled_81f_peak_gib")
    ratio = round(tiled / untiled, 3) if isinstance(tiled, float) and isinstance(untiled, float) else None
    details["tiled_over_untiled_peak_81f"] = ratio
    return {
        "value": ratio,
        "compared": "peak GPU memory decoding 81 frames at 480x832, tiled / untiled",
        "details": details,
    }


def _decode_figures(folder: str, tiling: bool) -> dict:
    import torch

    from benchmarks.gpu_common import cuda_timed, peak_gib
    from sora_model.autoencoder import DiffusersAutoencoder

    ae = DiffusersAutoencoder(folder, tiling=tiling).to("cuda", torch.bfloat16)
    ae.latents_mean, ae.latents_std = ae.latents_mean.float(), ae.latents_std.float()
    tag = "tiled" if tiling else "untiled"
    out: dict = {}
    for frames, lt in LATENT_FRAMES.items():
        z = torch.randn(1, 16, lt, 60, 104, device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                sec = cuda_timed(lambda z=z: ae.decode(z), 1)[0]
            out[f"{tag}_{frames}f_peak_gib"] = peak_gib()
            out[f"{tag}_{frames}f_seconds"] = round(sec, 2)
        except torch.cuda.OutOfMemoryError:
            out[f"{tag}_{frames}f_peak_gib"] = "out of memory"
    return out


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
