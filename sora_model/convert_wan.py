"""Wan in our format: a `diffusers` WanPipeline folder -> an export (`model.safetensors` + `config.json`).

    from sora_model.convert_wan import convert_wan_folder
    convert_wan_folder("Wan2.1-T2V-1.3B-Diffusers", "exports/wan-1.3b")      # or: sora convert --from-diffusers

The folder is what `WanPipeline.save_pretrained` writes (and what the Hub's `Wan-AI/Wan2.1-T2V-*-Diffusers`
repositories hold): `model_index.json`, `transformer/` (WanTransformer3DModel), `text_encoder/` (umT5),
`tokenizer/`, `vae/` (AutoencoderKLWan) and `scheduler/`. Only the transformer's weights are rewritten; the
export's text encoder and autoencoder point at the folder's parts by absolute path, so they are not copied.

Also converted: `WanImageToVideoPipeline` folders (Wan2.1 I2V and FLF2V: a 36-channel transformer with `image_dim`,
and `pos_embed_seq_len` for FLF2V), whose `image_encoder/` (CLIPVisionModel) and `image_processor/` are copied into
the export; and Wan2.2's two experts (`transformer_2` with `boundary_ratio`), the second written to
`model_2.safetensors` (tests/unit/test_wan_i2v.py, tests/unit/test_wan22_experts.py).

The transformer maps onto our DiT with `config.WAN_OPTIONS` exactly (tests/unit/test_wan_parity.py):
q/k/v projections concatenate into our fused ones, and the output projection's rows are reordered from Wan's
(p_t, p_h, p_w, C) patch layout to ours (C, p_t, p_h, p_w). The folder's scheduler becomes our sampling settings
in `wan_scheduler.py`. Reading is safetensors and JSON only; diffusers is not imported.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import (
    WAN_OPTIONS,
    AutoencoderConfig,
    DiTConfig,
    ImageEncoderConfig,
    PipelineConfig,
    SampleConfig,
    TextEncoderConfig,
)
from .export_io import MODEL_2_FILE, save_export
from .wan_scheduler import WanFolderError, diffusion_config_from_scheduler

WAN_MASK_CHANNELS = 4
"""I2V's mask channels: one per frame of the first latent frame's group (the Wan VAE's temporal factor 4)."""
WAN_TEXT_TOKENS = 512
"""Wan pads every caption's umT5 tokens with zeros to 512 and attends to all of them (`max_sequence_length`)."""
WAN_SAMPLE = SampleConfig(num_frames=81, height=480, width=832, fps=16)
"""WanPipeline's defaults (81 frames at 480x832, exported at 16 fps): what the 1.3B model was tuned for."""
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
IMAGE_KEYS = {
    "image_dim": "image conditioning (Wan2.1 I2V)",
    "added_kv_proj_dim": "image conditioning (Wan2.1 I2V)",
    "pos_embed_seq_len": "image position embeddings (Wan2.1 FLF2V)",
}
"""Transformer settings only a WanImageToVideoPipeline folder (which has the image encoder they need) may set."""
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
IMAGE_PARTS = ("image_encoder", "image_processor")
"""The I2V folder's CLIP parts, copied into the export under these names (the export's config names them relatively)."""

# (Wan Linear module, our module, part, parts): q/k/v and k/v are slices of our fused projections.
_LINEAR_RULES: list[tuple[str, str, int, int]] = [
    (r"condition_embedder\.time_embedder\.linear_1", "t_embedder.mlp.0", 0, 1),
    (r"condition_embedder\.time_embedder\.linear_2", "t_embedder.mlp.2", 0, 1),
    (r"condition_embedder\.time_proj", "modulation_proj.1", 0, 1),
    (r"condition_embedder\.text_embedder\.linear_1", "context_embedder.0", 0, 1),
    (r"condition_embedder\.text_embedder\.linear_2", "context_embedder.2", 0, 1),
    (r"blocks\.(\d+)\.attn1\.to_q", r"blocks.\1.attn.qkv", 0, 3),
    (r"blocks\.(\d+)\.attn1\.to_k", r"blocks.\1.attn.qkv", 1, 3),
    (r"blocks\.(\d+)\.attn1\.to_v", r"blocks.\1.attn.qkv", 2, 3),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.attn.proj", 0, 1),
    (r"blocks\.(\d+)\.attn2\.to_q", r"blocks.\1.cross_attn.q", 0, 1),
    (r"blocks\.(\d+)\.attn2\.to_k", r"blocks.\1.cross_attn.kv", 0, 2),
    (r"blocks\.(\d+)\.attn2\.to_v", r"blocks.\1.cross_attn.kv", 1, 2),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.proj", 0, 1),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.mlp.0", 0, 1),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.mlp.2", 0, 1),
    (r"proj_out", "final_layer.linear", 0, 1),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "image_embedder.mlp.0", 0, 1),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "image_embedder.mlp.2", 0, 1),
    (r"blocks\.(\d+)\.attn2\.add_k_proj", r"blocks.\1.cross_attn.kv_image", 0, 2),
    (r"blocks\.(\d+)\.attn2\.add_v_proj", r"blocks.\1.cross_attn.kv_image", 1, 2),
]
# Other parameters, renamed as they are.
_PARAM_RULES: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"blocks\.(\d+)\.attn1\.norm_q\.weight", r"blocks.\1.attn.q_norm.weight"),
    (r"blocks\.(\d+)\.attn1\.norm_k\.weight", r"blocks.\1.attn.k_norm.weight"),
    (r"blocks\.(\d+)\.attn2\.norm_q\.weight", r"blocks.\1.cross_attn.q_norm.weight"),
    (r"blocks\.(\d+)\.attn2\.norm_k\.weight", r"blocks.\1.cross_attn.k_norm.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation.table"),
    (r"scale_shift_table", "final_layer.modulation.table"),
    (r"condition_embedder\.image_embedder\.(norm1|norm2)\.(weight|bias)", r"image_embedder.\1.\2"),
    (r"condition_embedder\.image_embedder\.pos_embed", "image_embedder.pos_embed"),
    (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.k_image_norm.weight"),
]
_IGNORED = r"blocks\.(\d+)\.attn2\.norm_added_q\.weight"
"""Saved by some Wan I2V checkpoints and unused by Wan's attention (diffusers ignores it on load too)."""


def wan_linear_target(name: str) -> tuple[str, int, int] | None:
    """(our module, part, parts) for a Wan Linear module name (`blocks.0.attn1.to_k` -> ("blocks.0.attn.qkv", 1, 3)),
    None for a name that is no Wan Linear. LoRA adapters trained on the diffusers model merge through this."""
    for pattern, target, part, parts in _LINEAR_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name), part, parts
    return None


def output_row_order(patch: tuple[int, int, int], channels: int) -> torch.Tensor:
    """Index of Wan's output row for each of ours: Wan lays a patch out (p_t, p_h, p_w, C), we (C, p_t, p_h, p_w)."""
    return torch.arange(math.prod(patch) * channels).reshape(math.prod(patch), channels).T.flatten()


def dit_config_from_wan(config: dict, image_tokens: int | None = None) -> DiTConfig:
    """Our DiTConfig for a WanTransformer3DModel config.json; WanFolderError for what the DiT cannot express.

    image_tokens: tokens the folder's image encoder gives per image (I2V folders; 0 for one without an image encoder);
    None for a WanPipeline folder, whose transformer may then set none of IMAGE_KEYS."""
    if config.get("_class_name") != "WanTransformer3DModel":
        raise WanFolderError(f"transformer is a {config.get('_class_name')}, not a WanTransformer3DModel")
    if image_tokens is None:
        for key, what in IMAGE_KEYS.items():
            if config.get(key) is not None:
                raise WanFolderError(
                    f"transformer config sets {key}: {what} needs a WanImageToVideoPipeline "
                    "folder with its image encoder"
                )
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise WanFolderError(
            f"transformer qk_norm '{config.get('qk_norm')}' is not supported (only rms_norm_across_heads)"
        )
    if not config.get("cross_attn_norm", True):
        raise WanFolderError("transformer cross_attn_norm false is not supported (Wan2.1 T2V has it true)")
    if float(config.get("eps", 1e-6)) != 1e-6:
        raise WanFolderError(f"transformer eps {config.get('eps')} is not supported (only 1e-6)")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    channels = int(config.get("in_channels", 16))
    out_channels = int(config.get("out_channels") or channels)
    if out_channels != channels and image_tokens is None:
        raise WanFolderError(
            f"transformer out_channels {out_channels} differs from in_channels {channels} (image-to-video needs a "
            "WanImageToVideoPipeline folder)"
        )
    hw = 2 * (head_dim // 6)  # Wan's RoPE split: equal even h and w parts, the rest rotates with t
    return DiTConfig(
        **{
            **WAN_OPTIONS,
            **_image_options(config, image_tokens, heads * head_dim),
            "in_channels": channels,
            "out_channels": None if out_channels == channels else out_channels,
            "patch_size": tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
            "hidden_size": heads * head_dim,
            "depth": int(config["num_layers"]),
            "num_heads": heads,
            "ffn_dim": int(config["ffn_dim"]),
            "text_dim": int(config.get("text_dim", 4096)),
            "timestep_freq_dim": int(config.get("freq_dim", 256)),
            "rope_split": (head_dim - 2 * hw, hw, hw),
        }
    )


def _image_options(config: dict, image_tokens: int | None, width: int) -> dict:
    """The DiTConfig image options of an I2V/FLF2V transformer config (empty when it reads no image features)."""
    image_dim = config.get("image_dim")
    if image_tokens is None or image_dim is None:
        return {}
    if image_tokens == 0:
        raise WanFolderError(f"transformer sets image_dim {image_dim} but the folder has no image_encoder")
    if int(config.get("added_kv_proj_dim") or 0) != width:
        raise WanFolderError(
            f"transformer added_kv_proj_dim {config.get('added_kv_proj_dim')} must equal its width {width} (Wan's "
            "image keys read embedded tokens)"
        )
    positions = config.get("pos_embed_seq_len")
    if positions is not None and int(positions) != 2 * image_tokens:
        raise WanFolderError(
            f"transformer pos_embed_seq_len {positions} is not two images of the image encoder's {image_tokens} tokens"
        )
    return {"image_dim": int(image_dim), "image_tokens": image_tokens, "image_positions": positions is not None}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WanFolderError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WanFolderError(f"{path} is not valid JSON: {err}") from None


def pipeline_config_from_wan(folder: str | Path) -> PipelineConfig:
    """The export config.json for a WanPipeline folder (parts referenced by absolute path)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder")
    index = _read_json(root / "model_index.json", f"'{folder}' is not a diffusers pipeline folder")
    if index.get("_class_name") not in PIPELINES:
        raise WanFolderError(
            f"'{folder}' holds a {index.get('_class_name')}, not a WanPipeline or WanImageToVideoPipeline"
        )
    if index.get("expand_timesteps"):
        raise WanFolderError(f"'{folder}' uses per-token timesteps (Wan2.2 TI2V), which are not supported")
    image_tokens = None  # T2V; 0: I2V by latents alone (Wan2.2 I2V has no image encoder)
    if index["_class_name"] == "WanImageToVideoPipeline":
        image_tokens = 0 if index.get("image_encoder") in (None, [None, None]) else _image_encoder_tokens(root)
    model = dit_config_from_wan(_read_json(root / "transformer" / "config.json", "transformer config"), image_tokens)
    boundary = _experts(root, index, model, image_tokens)
    if image_tokens is not None and model.in_channels != 2 * model.predicted_channels + WAN_MASK_CHANNELS:
        raise WanFolderError(
            f"transformer in_channels {model.in_channels} is not noise + {WAN_MASK_CHANNELS} mask + condition latents "
            f"({2 * model.predicted_channels + WAN_MASK_CHANNELS} for {model.predicted_channels} latent channels)"
        )
    text = _read_json(root / "text_encoder" / "config.json", "text encoder config")
    if text.get("model_type") not in ("umt5", "t5", "mt5"):
        raise WanFolderError(f"text_encoder is a '{text.get('model_type')}' model, expected umT5")
    if int(text.get("d_model", model.text_dim)) != model.text_dim:
        raise WanFolderError(
            f"text_encoder width {text.get('d_model')} differs from the transformer's text_dim {model.text_dim}"
        )
    if not (root / "tokenizer").is_dir():
        raise WanFolderError(f"'{folder}' has no tokenizer/ folder")
    vae = _read_json(root / "vae" / "config.json", "VAE config")
    if vae.get("_class_name") != "AutoencoderKLWan":
        raise WanFolderError(f"vae is a {vae.get('_class_name')}, not an AutoencoderKLWan")
    if int(vae.get("z_dim", model.predicted_channels)) != model.predicted_channels:
        raise WanFolderError(
            f"vae z_dim {vae.get('z_dim')} differs from the transformer's {model.predicted_channels} latent channels"
        )
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return PipelineConfig(
        model=model,
        diffusion=diffusion_config_from_scheduler(scheduler),
        text_encoder=TextEncoderConfig(
            name_or_path=str(root / "text_encoder"),
            tokenizer_path=str(root / "tokenizer"),
            max_length=WAN_TEXT_TOKENS,
            clean_prompts=True,
        ),
        autoencoder=AutoencoderConfig(kind="diffusers", path=str(root / "vae")),
        sample=WAN_SAMPLE,
        image_encoder=ImageEncoderConfig(*IMAGE_PARTS) if model.image_dim is not None else ImageEncoderConfig(),
        boundary_ratio=boundary,
        preset=None,
    )


def _image_encoder_tokens(root: Path) -> int:
    """Feature tokens per image of an I2V folder's CLIPVisionModel (patches + class token); checks its processor."""
    config = _read_json(root / "image_encoder" / "config.json", "image encoder config")
    if config.get("architectures") not in (None, ["CLIPVisionModel"]) and config.get("model_type") not in (
        "clip_vision_model",
        "clip",
    ):
        raise WanFolderError(f"image_encoder is a {config.get('architectures')}, not a CLIPVisionModel")
    vision = config.get("vision_config", config)
    _read_json(root / "image_processor" / "preprocessor_config.json", "image processor config")
    return (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 32))) ** 2 + 1


def _experts(root: Path, index: dict, model: DiTConfig, image_tokens: int | None) -> float | None:
    """Wan2.2's boundary_ratio when the folder has a second expert (`transformer_2`) of the first's shape; else None."""
    second = index.get("transformer_2") not in (None, [None, None])
    ratio = index.get("boundary_ratio")
    if index.get("transformer") in (None, [None, None]):
        raise WanFolderError(f"'{root}' has no transformer (a low-noise expert alone is not supported)")
    if second != (ratio is not None):
        raise WanFolderError(
            f"'{root}' sets {'transformer_2' if second else 'boundary_ratio'} without "
            f"{'boundary_ratio' if second else 'transformer_2'}: two experts need both"
        )
    if not second:
        return None
    other = dit_config_from_wan(
        _read_json(root / "transformer_2" / "config.json", "transformer_2 config"), image_tokens
    )
    if other != model:
        raise WanFolderError("transformer_2 has another shape than transformer; the two experts must have one")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise WanFolderError(f"boundary_ratio {ratio!r} must be a number in (0, 1)")
    return float(ratio)


def load_wan_weights(transformer_dir: str | Path) -> dict[str, torch.Tensor]:
    """A WanTransformer3DModel's state dict from its folder: one safetensors file or an index of shards."""
    folder = Path(transformer_dir)
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(str(folder / WEIGHTS_FILE))
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        raise WanFolderError(
            f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (only safetensors weights are read)"
        )
    shards = sorted(set(_read_json(index, "weights index")["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


def convert_wan_state_dict(wan: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Wan transformer weights -> our DiT's state dict for `cfg` (from `dit_config_from_wan`); every weight used
    once."""
    linears: dict[str, dict[str, list[torch.Tensor | None]]] = {}
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in wan.items():
        module, _, kind = key.rpartition(".")
        target = wan_linear_target(module) if kind in ("weight", "bias") else None
        if target is not None:
            name, part, parts = target
            linears.setdefault(f"{name}.{kind}", {}).setdefault("parts", [None] * parts)[part] = value
            continue
        for pattern, replacement in _PARAM_RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            if not re.fullmatch(_IGNORED, key):
                unused.append(key)
    if unused:
        raise WanFolderError(f"transformer weights this converter does not know: {', '.join(sorted(unused)[:3])}")
    for key, entry in linears.items():
        parts = entry["parts"]
        if any(p is None for p in parts):
            raise WanFolderError(f"transformer weights lack part of {key} (q, k and v must all be present)")
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts)  # (parts * D_out, D_in) or (parts * D_out,)
    # Tables: Wan's (1, n, D) -> (n, D); output rows: Wan's patch layout -> ours.
    for key in [k for k in out if k.endswith("modulation.table")]:
        out[key] = out[key].reshape(-1, cfg.hidden_size)
    order = output_row_order(cfg.patch_size, cfg.predicted_channels)
    for kind in ("weight", "bias"):
        out[f"final_layer.linear.{kind}"] = out[f"final_layer.linear.{kind}"][order]
    return {k: v.contiguous() for k, v in out.items()}


def convert_wan_folder(folder: str | Path, export_dir: str | Path) -> PipelineConfig:
    """Write our export for a WanPipeline or WanImageToVideoPipeline folder; returns its config. Checks every weight
    against a fresh DiT. A second expert goes to `model_2.safetensors`; an image encoder and processor are copied."""
    config = pipeline_config_from_wan(folder)
    root = Path(folder).resolve()
    state = _converted_weights(root / "transformer", config.model)
    save_export(str(export_dir), config, state)
    del state
    if config.boundary_ratio is not None:
        save_file(_converted_weights(root / "transformer_2", config.model), str(Path(export_dir) / MODEL_2_FILE))
    if config.model.image_dim is not None:
        for part in IMAGE_PARTS:
            shutil.copytree(root / part, Path(export_dir) / part, dirs_exist_ok=True)
    return config


def _converted_weights(transformer_dir: Path, cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """One Wan transformer folder's weights in our DiT's names, checked against the DiT's shapes."""
    from .dit import DiT

    state = convert_wan_state_dict(load_wan_weights(transformer_dir), cfg)
    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        expected = DiT(cfg).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WanFolderError(
            f"converted weights do not fit the DiT: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WanFolderError(
                f"weight {key} has shape {tuple(value.shape)}, the DiT expects {tuple(expected[key].shape)}"
            )
    return {k: v.contiguous() for k, v in state.items()}
