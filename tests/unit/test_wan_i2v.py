"""Wan2.1 image-to-video (I2V) and first-last-frame (FLF2V) in our DiT: tiny random `WanImageToVideoPipeline` folders
(made here with `save_pretrained`: CLIPVisionModel, a 12-channel WanTransformer3DModel with `image_dim`, and
`pos_embed_seq_len` for FLF2V) converted by `sora convert --from-diffusers`, then compared with diffusers in fp32:

- the converted DiT's output equals `WanTransformer3DModel`'s with image features (asserted <= 1e-4);
- 3 CFG sampling steps from an input image of another size than the output (non-square) equal the pipeline's
  latents with the same seed (asserted <= 1e-4), for I2V and FLF2V;
- bad inputs (a text-only export given an image, a missing or unreadable image, a missing last image) fail with
  one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers import I2V_IMAGE_DIM as IMAGE_DIM  # noqa: E402
from helpers import I2V_IMAGE_TOKENS as IMAGE_TOKENS  # noqa: E402
from helpers import I2V_IN_CHANNELS as IN_CHANNELS  # noqa: E402
from helpers import WAN_CHANNELS, WAN_TEXT_DIM, make_tiny_i2v_folder, make_tiny_wan_folder, perturb  # noqa: E402

from pipelines.cli import main  # noqa: E402
from sora_model.dit import DiT  # noqa: E402
from sora_model.pipeline import MODEL_FILE, TextToVideoPipeline, load_export_config  # noqa: E402

TOL = 1e-4
OPTIONS = {"num_frames": 9, "height": 32, "width": 48, "guidance_scale": 5.0}
PROMPT = "a red circle &amp; a  blue square"


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def case(request, tmp_path_factory) -> tuple[str, Path, Path]:
    base = tmp_path_factory.mktemp(request.param)
    folder = make_tiny_i2v_folder(base / "Wan-tiny-Diffusers", flf2v=request.param == "flf2v")
    out = base / "export"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    return request.param, folder, out


def _images() -> tuple:
    from PIL import Image

    g = np.random.default_rng(0)
    first = Image.fromarray(g.integers(0, 256, (40, 28, 3), dtype=np.uint8))  # portrait, output is landscape 32x48
    last = Image.fromarray(g.integers(0, 256, (24, 64, 3), dtype=np.uint8))
    return first, last


def test_export_config_and_parts(case) -> None:
    kind, _, export = case
    cfg = load_export_config(str(export))
    m = cfg.model
    assert (m.in_channels, m.out_channels, m.image_dim, m.image_tokens, m.image_positions) == (
        IN_CHANNELS,
        WAN_CHANNELS,
        IMAGE_DIM,
        IMAGE_TOKENS,
        kind == "flf2v",
    )
    assert (cfg.image_encoder.path, cfg.image_encoder.processor_path) == ("image_encoder", "image_processor")
    assert (export / "image_encoder" / "config.json").is_file() and (
        export / "image_processor" / "preprocessor_config.json"
    ).is_file()


def test_dit_output_equals_wan_transformer(case) -> None:
    from safetensors.torch import load_file

    kind, folder, export = case
    wan = diffusers.WanTransformer3DModel.from_pretrained(str(folder / "transformer")).eval()
    ours = DiT(load_export_config(str(export)).model)
    ours.load_state_dict(load_file(str(export / MODEL_FILE)))
    g = torch.Generator().manual_seed(1)
    images = 2 if kind == "flf2v" else 1
    x = torch.randn(2, IN_CHANNELS, 3, 8, 12, generator=g)
    # Wan's attention takes the last 512 context tokens as the caption
    text = torch.randn(2, 512, WAN_TEXT_DIM, generator=g)
    text[:, 9:] = 0
    features = torch.randn(2, images * IMAGE_TOKENS, IMAGE_DIM, generator=g)
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad():
        expected = wan(
            x,
            t,
            text,
            encoder_hidden_states_image=features.reshape(2 * images, IMAGE_TOKENS, IMAGE_DIM),
            return_dict=False,
        )[0]
        got = ours.eval()(
            x,
            t,
            text,
            torch.ones(text.shape[:2], dtype=torch.bool),
            torch.zeros(2, WAN_TEXT_DIM),
            image_features=features,
        )
    diff = (got - expected).abs().max().item()
    print(
        f"{kind}: DiT vs WanTransformer3DModel, fp32: max abs difference {diff:.2e} (output scale "
        f"{expected.abs().max().item():.2f})"
    )
    assert got.shape == (2, WAN_CHANNELS, 3, 8, 12)
    assert diff <= TOL
    with pytest.raises(ValueError, match="image_features of shape"):
        ours(x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), torch.zeros(2, WAN_TEXT_DIM))


def test_sampling_equals_wan_image_to_video_pipeline(case, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """3 Euler steps, CFG 5 against the empty prompt, same seed; the image is 28x40, the clip 48x32."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # diffusers 0.42's I2V module calls ftfy without checking it is installed (its T2V module checks); use the
    # T2V module's cleaning, the same steps when ftfy is absent, so the reference runs here.
    monkeypatch.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)
    kind, folder, export = case
    first, last = _images()
    extra = {"last_image": last} if kind == "flf2v" else {}
    wan = diffusers.WanImageToVideoPipeline.from_pretrained(str(folder))
    wan.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = wan(
            image=first,
            prompt=PROMPT,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            **OPTIONS,
            **extra,
        ).frames
    pipe = TextToVideoPipeline.load(str(export))
    got = pipe.sample_latents(PROMPT, image=first, steps=3, seed=7, **OPTIONS, **extra)
    diff = (got - expected).abs().max().item()
    print(f"{kind}: 3 CFG sampling steps vs WanImageToVideoPipeline, fp32: max abs latent difference {diff:.2e}")
    assert got.shape == expected.shape == (1, WAN_CHANNELS, 3, 4, 6)
    assert diff <= TOL
    # The same image as a file path and as an array gives the same clip.
    first.save(tmp_path / "first.png")
    extra = {"last_image": np.asarray(last)} if kind == "flf2v" else {}
    again = pipe.sample_latents(PROMPT, image=str(tmp_path / "first.png"), steps=3, seed=7, **OPTIONS, **extra)
    assert (again - got).abs().max().item() == 0


def test_bad_images_fail_with_one_line(case, tmp_path: Path) -> None:
    kind, _, export = case
    pipe = TextToVideoPipeline.load(str(export))
    first, last = _images()
    small = {**OPTIONS, "steps": 1}
    with pytest.raises(ValueError, match="missing.png' is not a file"):
        pipe.sample_latents(
            PROMPT, image=str(tmp_path / "missing.png"), last_image=last if kind == "flf2v" else None, **small
        )
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png' cannot be read as an image"):
        pipe.sample_latents(
            PROMPT, image=str(tmp_path / "bad.png"), last_image=last if kind == "flf2v" else None, **small
        )
    with pytest.raises(ValueError, match="give the first frame as image"):
        pipe.sample_latents(PROMPT, **small)
    with pytest.raises(
        ValueError, match="needs last_image" if kind == "flf2v" else "last_image needs a first-last-frame"
    ):
        pipe.sample_latents(PROMPT, image=first, **({} if kind == "flf2v" else {"last_image": last}), **small)
    with pytest.raises(ValueError, match="uint8, or float"):
        pipe.sample_latents(
            PROMPT, image=np.full((8, 8, 3), 7.0), last_image=last if kind == "flf2v" else None, **small
        )


def test_generate_cli_with_image(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    kind, _, export = case
    first, last = _images()
    first.save(tmp_path / "first.png")
    last.save(tmp_path / "last.png")
    args = [
        "generate",
        "--model",
        str(export),
        "--prompt",
        "a cat",
        "--frames",
        "9",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "clip.npz"),
        "--image",
        str(tmp_path / "first.png"),
    ]
    if kind == "flf2v":
        args += ["--last-image", str(tmp_path / "last.png")]
    assert main(args) == 0
    assert np.load(tmp_path / "clip.npz")["frames"].shape == (9, 32, 48, 3)
    capsys.readouterr()
    if kind == "flf2v":  # without the last frame: refused before sampling
        assert main(args[:-2]) == 2
        err = capsys.readouterr().err.strip()
        assert "needs --last-image" in err and "\n" not in err, err
    args[-1] = str(tmp_path / "nowhere.png")  # the last argument is a path: now a missing file
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere.png" in err and "\n" not in err, err


def test_text_only_export_refuses_an_image(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = make_tiny_wan_folder(tmp_path / "t2v")
    export = tmp_path / "export"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(export)]) == 0
    _images()[0].save(tmp_path / "first.png")
    capsys.readouterr()
    args = [
        "generate",
        "--model",
        str(export),
        "--prompt",
        "a cat",
        "--frames",
        "5",
        "--height",
        "16",
        "--width",
        "16",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "clip.npz"),
        "--image",
        str(tmp_path / "first.png"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "text-to-video only" in err and "\n" not in err, err


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_samples_close_to_fp32(case, precision: str) -> None:
    """bf16 weights and int8 dynamic quantisation reach the image path too (its MLP, key/value projections)."""
    kind, _, export = case
    first, last = _images()
    options = {**OPTIONS, "steps": 2, "seed": 3, "image": first, **({"last_image": last} if kind == "flf2v" else {})}
    exact = TextToVideoPipeline.load(str(export)).sample_latents(PROMPT, **options)
    got = TextToVideoPipeline.load(str(export), precision=precision).sample_latents(PROMPT, **options)
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max().item() < 0.1 * exact.abs().max().item()


def test_i2v_without_image_encoder_equals_wan_pipeline(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Wan2.2's I2V form: the 12-channel input and no CLIP features (no `image_dim`, no image encoder in the folder)."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    monkeypatch.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)  # as in the test above
    folder = make_tiny_i2v_folder(tmp_path / "with-clip", flf2v=False)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=IN_CHANNELS,
        out_channels=WAN_CHANNELS,
        text_dim=WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=32,
    )
    perturb(transformer, 2)
    wan = diffusers.WanImageToVideoPipeline.from_pretrained(str(folder))
    wan = diffusers.WanImageToVideoPipeline(
        tokenizer=wan.tokenizer,
        text_encoder=wan.text_encoder,
        vae=wan.vae,
        scheduler=wan.scheduler,
        transformer=transformer.eval(),
    )
    wan.save_pretrained(str(tmp_path / "no-clip"))
    export = tmp_path / "export"
    assert main(["convert", "--from-diffusers", str(tmp_path / "no-clip"), "--out", str(export)]) == 0
    first = _images()[0]
    wan.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = wan(
            image=first,
            prompt=PROMPT,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            **OPTIONS,
        ).frames
    pipe = TextToVideoPipeline.load(str(export))
    assert pipe.image_encoder is None
    diff = (pipe.sample_latents(PROMPT, image=first, steps=3, seed=7, **OPTIONS) - expected).abs().max().item()
    print(
        "I2V without CLIP (Wan2.2 form), 3 CFG steps vs WanImageToVideoPipeline, fp32: max abs latent difference "
        f"{diff:.2e}"
    )
    assert diff <= TOL
