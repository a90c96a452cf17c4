"""Image-to-video fine-tuning sees the condition sampling gives: for the same first (and last) frame, what
`sora data prepare --image-conditioning` stores and the trainer feeds the model (mask + conditioning latents, image
features) equals what `TextToVideoPipeline.sample_latents(image=...)` builds. A tiny random I2V / FLF2V export (tiny
Wan VAE with 4x time compression, tiny CLIP; made with diffusers' classes and `sora convert`), no Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers import make_tiny_i2v_export  # noqa: E402

FRAMES, HEIGHT, WIDTH = 5, 32, 48  # 1 + 4 frames: 2 latent frames; non-square


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def export(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, make_tiny_i2v_export(tmp_path_factory.mktemp(request.param), flf2v=request.param == "flf2v")


def _clips(n: int = 2) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)  # (B, F, H, W, 3)


def _stepper(export: Path, null_prompt: dict | None = None):
    from pipelines.train.recipe import parse_recipe
    from pipelines.train.step import Stepper

    stage = {
        "name": "clips",
        "dataset": f"{FRAMES}x{HEIGHT}x{WIDTH}",
        "frames": FRAMES,
        "height": HEIGHT,
        "width": WIDTH,
        "steps": 1,
        "lr": 1e-4,
    }
    recipe = parse_recipe({"name": "i2v", "init_from": str(export), "stages": [stage]})
    grid = (2, HEIGHT // 16, WIDTH // 16)  # latents (2, H/8, W/8) in 1x2x2 patches
    return Stepper(recipe, recipe.stages[0], None, None, grid, 0, 1, torch.device("cpu"), null_prompt=null_prompt)


def test_training_condition_equals_sampling_condition(export) -> None:
    from PIL import Image

    from pipelines.data.prepare.encode import Patchify
    from pipelines.data.prepare.from_export import image_conditioning
    from sora_model.i2v_condition import image_condition
    from sora_model.pipeline import TextToVideoPipeline, load_export_config

    kind, folder = export
    config = load_export_config(str(folder))
    pipe = TextToVideoPipeline.load(str(folder))
    cond = image_conditioning(config, str(folder))
    assert cond.images == (2 if kind == "flf2v" else 1) and Path(cond.encoder.path).is_absolute()
    pixels = _clips()
    # What prepare stores (the encode stage's own object), then what the trainer makes of it.
    stored = Patchify(config.autoencoder, config.model.patch_size, image_conditioning=cond).condition(pixels)
    assert stored["image_condition"].dtype == np.float32 and stored["image_features"].dtype == np.float16
    stepper = _stepper(folder)
    channels, features = stepper._image_inputs({k: torch.from_numpy(v) for k, v in stored.items()})
    m = config.model
    assert channels.shape == (2, m.in_channels - m.predicted_channels, 2, HEIGHT // 8, WIDTH // 8)
    assert features.shape == (2, m.image_count * m.image_tokens, m.image_dim) and features.dtype == torch.float32
    for i, clip in enumerate(pixels):
        first = Image.fromarray(clip[0])
        last = Image.fromarray(clip[-1]) if kind == "flf2v" else None
        sampled = pipe.image_condition(first, last, FRAMES, HEIGHT, WIDTH)
        diff = (channels[i : i + 1] - sampled.channels).abs().max().item()
        print(f"{kind} clip {i}: training vs sampling condition channels: max abs difference {diff:.2e}")
        assert diff <= 1e-5
        mask = m.in_channels - 2 * m.predicted_channels
        assert torch.equal(channels[i, :mask], sampled.channels[0, :mask])  # the mask, exactly
        scale = sampled.features.abs().max().item()
        assert (features[i : i + 1] - sampled.features).abs().max().item() <= 1e-3 * max(1.0, scale)  # stored in fp16
        # The shared function is what sampling builds (sora_model/pipeline.py calls it).
        images = [first] + ([last] if last else [])
        shared = image_condition(images, FRAMES, HEIGHT, WIDTH, pipe.autoencoder, pipe.image_encoder, "cpu")
        assert torch.equal(shared.channels, sampled.channels) and torch.equal(shared.features, sampled.features)


def test_step_feeds_condition_and_loss_covers_predicted_channels(export) -> None:
    """One training loss through the real DiT: the model reads noisy latents + condition (in_channels) and the image
    features, and the loss compares predicted channels only; a different first frame changes the prediction."""
    from pipelines.data.prepare.encode import Patchify
    from pipelines.data.prepare.from_export import image_conditioning
    from sora_model.diffusion import build_diffusion
    from sora_model.pipeline import TextToVideoPipeline, load_export_config

    _, folder = export
    config = load_export_config(str(folder))
    pipe = TextToVideoPipeline.load(str(folder))
    cond = image_conditioning(config, str(folder))
    patchify = Patchify(config.autoencoder, config.model.patch_size, image_conditioning=cond)
    pixels = _clips()
    tokens, grid = patchify(pixels)
    stored = patchify.condition(pixels)
    text = pipe.encode_prompts(["a red circle", "a blue square"])
    null = pipe.encode_prompts([""])  # Wan drops captions to the empty prompt's embedding
    stepper = _stepper(folder, {"tokens": null.tokens[0], "mask": null.mask[0], "pooled": null.pooled[0]})
    stepper.engine, stepper.diffusion = pipe.model.train().requires_grad_(True), build_diffusion(config.diffusion)
    stepper.cond_dropout = 0.0
    batch = {
        "patches": torch.from_numpy(tokens),
        "text_tokens": text.tokens.half(),
        "text_mask": text.mask,
        "text_pooled": text.pooled.half(),
        **{k: torch.from_numpy(v) for k, v in stored.items()},
    }
    assert tuple(grid) == stepper.grid
    loss = stepper._losses(batch, torch.Generator().manual_seed(0))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grad = pipe.model.patch_embed.proj.weight.grad  # (D, C_in, pt, ph, pw)
    assert grad[:, config.model.predicted_channels :].abs().sum() > 0  # the condition channels are read
    other = {**batch, **{k: torch.from_numpy(v) for k, v in patchify.condition(pixels[::-1].copy()).items()}}
    again = stepper._losses(other, torch.Generator().manual_seed(0))["loss"]
    assert not torch.equal(loss.detach(), again.detach())  # the first frame conditions the prediction
