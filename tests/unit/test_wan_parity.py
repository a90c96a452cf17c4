"""Wan2.1 in our DiT: a tiny random diffusers WanPipeline (made here with `save_pretrained`, nothing downloaded)
converted by `sora convert --from-diffusers`, then compared with diffusers' own classes in fp32.

- the converted DiT's output equals `WanTransformer3DModel`'s (max abs difference printed, asserted <= 1e-4);
- 3 sampling steps of our pipeline with classifier-free guidance (empty negative prompt, Wan's convention)
  equal `WanPipeline`'s latents (`output_type="latent"`, FlowMatchEulerDiscreteScheduler with shift 3, same
  seed), asserted <= 1e-4;
- LoRA adapters made with peft, on our DiT or on the Wan transformer, merge into the converted weights and
  give the adapted models' outputs;
- bad folders fail with one line; a converted export generates an MP4 through `sora generate`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import WAN_CHANNELS, WAN_TEXT_DIM, make_tiny_wan_folder  # noqa: E402

from pipelines.cli import main  # noqa: E402
from sora_model.convert_wan import convert_wan_folder, output_row_order  # noqa: E402
from sora_model.dit import DiT  # noqa: E402
from sora_model.lora import LORA_TARGET_MODULES, merge_lora  # noqa: E402
from sora_model.pipeline import MODEL_FILE, TextToVideoPipeline, load_export_config  # noqa: E402

TOL = 1e-4
TEXT_DIM, CHANNELS = WAN_TEXT_DIM, WAN_CHANNELS


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A tiny Wan2.1 text-to-video pipeline folder: umT5 (MiniLM's tokenizer), Wan VAE with latent stats, shift 3."""
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")


@pytest.fixture(scope="module")
def export(wan_folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "wan-tiny"
    assert main(["convert", "--from-diffusers", str(wan_folder), "--out", str(out)]) == 0
    return out


def _our_dit(export: Path) -> DiT:
    from safetensors.torch import load_file

    model = DiT(load_export_config(str(export)).model)
    model.load_state_dict(load_file(str(export / MODEL_FILE)))
    return model.eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, 3, 8, 12, generator=g)
    text = torch.randn(batch, 10, TEXT_DIM, generator=g)
    text[1, 6:] = 0  # zero padding, as Wan's encode_prompt gives; attended like any token
    return x, torch.tensor([999.0, 321.5])[:batch], text


def test_export_config_is_wan(export: Path, wan_folder: Path) -> None:
    cfg = load_export_config(str(export))
    m = cfg.model
    assert (m.hidden_size, m.depth, m.num_heads, m.ffn_dim, m.text_dim, m.rope_split) == (
        32,
        2,
        2,
        48,
        TEXT_DIM,
        (8, 4, 4),
    )
    assert (m.modulation, m.qk_norm_over, m.pooled_text, m.text_padding, m.null_text) == (
        "shared",
        "width",
        False,
        "attended",
        "empty_prompt",
    )
    assert (cfg.diffusion.shift, cfg.diffusion.sampler, cfg.diffusion.time_grid) == (3.0, "euler", "flow_match_euler")
    assert cfg.text_encoder.name_or_path == str(wan_folder.resolve() / "text_encoder")
    assert (cfg.text_encoder.max_length, cfg.text_encoder.clean_prompts) == (512, True)
    assert cfg.autoencoder.path == str(wan_folder.resolve() / "vae")


def test_dit_output_equals_wan_transformer(export: Path, wan_folder: Path) -> None:
    wan = diffusers.WanTransformer3DModel.from_pretrained(str(wan_folder / "transformer")).eval()
    ours = _our_dit(export)
    x, t, text = _inputs()
    with torch.no_grad():
        expected = wan(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), torch.zeros(2, TEXT_DIM))
        # Packed (NaViT) forward of the same clips: the Wan options keep that path exact too.
        packed = ours(
            torch.cat([_patchify(c) for c in x]),
            t,
            text,
            torch.ones(text.shape[:2], dtype=torch.bool),
            torch.zeros(2, TEXT_DIM),
            grids=((3, 4, 6), (3, 4, 6)),
        )
    diff = (got - expected).abs().max().item()
    print(
        f"DiT vs WanTransformer3DModel, fp32: max abs difference {diff:.2e} "
        f"(output scale {expected.abs().max().item():.2f})"
    )
    assert diff <= TOL
    assert (torch.cat([_patchify(c) for c in got]) - packed).abs().max().item() <= TOL


def _patchify(clip: torch.Tensor) -> torch.Tensor:
    from sora_model.patch import patchify

    return patchify(clip[None], (1, 2, 2))[0]  # (N, P)


def test_sampling_equals_wan_pipeline(export: Path, wan_folder: Path) -> None:
    """3 Euler steps on the FlowMatchEuler grid, CFG 5 against the empty negative prompt, the same seed."""
    options = {"num_frames": 9, "height": 32, "width": 48, "guidance_scale": 5.0}
    wan = diffusers.WanPipeline.from_pretrained(str(wan_folder))
    wan.set_progress_bar_config(disable=True)
    prompt = "a  red circle &amp; a blue square"  # cleaned the same way on both sides
    with torch.no_grad():
        expected = wan(
            prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="latent", **options
        ).frames
    pipe = TextToVideoPipeline.load(str(export))
    got = pipe.sample_latents(prompt, steps=3, seed=7, **options)
    assert got.shape == expected.shape == (1, CHANNELS, 3, 4, 6)
    diff = (got - expected).abs().max().item()
    print(f"3 CFG sampling steps vs WanPipeline, fp32: max abs latent difference {diff:.2e}")
    assert diff <= TOL
    # Without guidance (one forward per step) too.
    with torch.no_grad():
        plain = wan(
            prompt,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            **{**options, "guidance_scale": 1.0},
        ).frames
    assert (
        pipe.sample_latents(prompt, steps=2, seed=7, **{**options, "guidance_scale": 1.0}) - plain
    ).abs().max().item() <= TOL


def test_lora_of_our_dit_merges_exactly(export: Path, tmp_path: Path) -> None:
    """An adapter trained on our DiT (peft, our target modules), merged at load, gives the adapted model's output."""
    base = _our_dit(export)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    adapted = peft.get_peft_model(_our_dit(export), config)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    changed = merge_lora(base, tmp_path / "adapter")
    assert len(changed) == 2 * 7  # 2 blocks x (qkv, proj, q, kv, proj, mlp.0, mlp.2)
    x, t, text = _inputs()
    args = (x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), torch.zeros(2, TEXT_DIM))
    with torch.no_grad():
        diff = (base(*args) - adapted(*args)).abs().max().item()
    assert diff <= TOL
    with torch.no_grad():
        assert (base(*args) - _our_dit(export)(*args)).abs().max().item() > 1e-3  # the adapter did change it


def test_lora_of_wan_transformer_merges_into_converted_dit(export: Path, wan_folder: Path, tmp_path: Path) -> None:
    """An adapter made on diffusers' WanTransformer3DModel (q/k/v into our fused projections, proj_out reordered)."""
    wan = diffusers.WanTransformer3DModel.from_pretrained(str(wan_folder / "transformer")).eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"]
    adapted = peft.get_peft_model(
        wan, peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=targets, init_lora_weights=False)
    )
    adapted.save_pretrained(str(tmp_path / "wan-adapter"))
    ours = _our_dit(export)
    merge_lora(ours, tmp_path / "wan-adapter")
    x, t, text = _inputs()
    with torch.no_grad():
        expected = adapted(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        got = ours(x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), torch.zeros(2, TEXT_DIM))
    assert (got - expected).abs().max().item() <= TOL


def test_output_row_order_inverts_wan_layout() -> None:
    rows = torch.arange(2 * 2 * 3).reshape(1, 2, 2, 3)  # (p_t, p_h, p_w, C) as Wan writes a patch
    ours = rows.permute(3, 0, 1, 2).flatten()  # (C, p_t, p_h, p_w)
    assert torch.equal(rows.flatten()[output_row_order((1, 2, 2), 3)], ours)


def test_generate_mp4_from_converted_export_with_lora(export: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    peft.get_peft_model(_our_dit(export), peft.LoraConfig(r=2, target_modules=LORA_TARGET_MODULES)).save_pretrained(
        str(adapter)
    )
    out = tmp_path / "clip.mp4"
    args = [
        "generate",
        "--model",
        str(export),
        "--prompt",
        "a red circle",
        "--frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--lora",
        str(adapter),
    ]
    assert main(args) == 0
    from sora_model.video import read_video

    frames = read_video(str(out))
    assert frames.shape[:3] == (5, 32, 32)


def test_convert_errors_are_one_line(wan_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    def convert(folder: Path) -> str:
        assert main(["convert", "--from-diffusers", str(folder), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err

    assert "is not a folder" in convert(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "model_index.json is missing" in convert(tmp_path / "empty")
    i2v = tmp_path / "i2v"
    shutil.copytree(wan_folder, i2v)
    config = json.loads((i2v / "transformer" / "config.json").read_text())
    (i2v / "transformer" / "config.json").write_text(json.dumps({**config, "image_dim": 1280}))
    assert "image conditioning" in convert(i2v)
    (i2v / "transformer" / "config.json").write_text(json.dumps(config))
    index = json.loads((i2v / "model_index.json").read_text())
    (i2v / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    assert "not a WanPipeline" in convert(i2v)


def test_convert_refuses_to_overwrite(export: Path, wan_folder: Path, capsys) -> None:  # noqa: ANN001
    assert main(["convert", "--from-diffusers", str(wan_folder), "--out", str(export)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert_wan_folder(wan_folder, export).model.depth == 2  # the library call overwrites


@pytest.mark.parametrize(
    "preset, wan_config",
    [
        ("Wan2.1-T2V-1.3B", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
        ("Wan2.1-T2V-14B", {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}),
    ],
)
def test_wan_presets_have_wans_parameter_count(preset: str, wan_config: dict) -> None:
    from sora_model.config import dit_preset

    with torch.device("meta"):  # shapes only
        ours = DiT(dit_preset(preset)).num_parameters()
        wan = sum(p.numel() for p in diffusers.WanTransformer3DModel(attention_head_dim=128, **wan_config).parameters())
    assert ours == wan


def test_wan_model_has_no_learned_null_and_keeps_tables_fp32(export: Path) -> None:
    model = _our_dit(export)
    assert not hasattr(model, "null_text_token") and not hasattr(model, "pooled_embedder")
    x, t, text = _inputs()
    mask, pooled = torch.ones(text.shape[:2], dtype=torch.bool), torch.zeros(2, TEXT_DIM)
    with pytest.raises(ValueError, match="empty_prompt"):
        model(x, t, text, mask, pooled, drop_text=torch.tensor([True, False]))
    with torch.no_grad():
        reference = model(x, t, text, mask, pooled)
        model.to_inference_dtype(torch.bfloat16)
        assert model.blocks[0].modulation.table.dtype == model.final_layer.modulation.table.dtype == torch.float32
        assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        low = model(x, t, text, mask, pooled)
    assert (low.float() - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def test_serve_generator_loads_converted_export_with_lora(export: Path, tmp_path: Path) -> None:
    """The Serve replica's constructor (no Ray needed to call it): settings -> load with the adapter -> model card."""
    from pipelines.serve.generator import Generator

    adapter = tmp_path / "adapter"
    peft.get_peft_model(_our_dit(export), peft.LoraConfig(r=2, target_modules=LORA_TARGET_MODULES)).save_pretrained(
        str(adapter)
    )
    generator = Generator.func_or_class(
        {"model": str(export), "lora": str(adapter), "store": str(tmp_path / "store"), "device": "cpu"}
    )
    assert (generator.card.num_frames, generator.card.height, generator.card.width) == (81, 480, 832)
    clips = generator.pipe(["a red circle", "a blue square"], num_frames=5, height=32, width=32, steps=1, seed=[0, 1])
    assert clips.shape == (2, 5, 32, 32, 3)
