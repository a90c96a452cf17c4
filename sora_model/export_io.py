"""The export folder: what `sora` writes after training or conversion and every stage loads.

An export is `model.safetensors` (+ `ema.safetensors`, + `model_2.safetensors` for a two-expert model) and
`config.json` (a `PipelineConfig` with its `format_version`): safetensors and JSON only, never a pickle. This module
names the files, reads and writes the config and resolves the paths it holds relative to the folder; `pipeline.py`
builds a pipeline from a folder (`dit_load.py` reads its weights) and `convert_wan.py` writes one from a diffusers
Wan folder.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import save_file

from .config import PipelineConfig
from .config_dict import from_dict, to_dict

EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
MODEL_2_FILE = "model_2.safetensors"
"""The second expert of a two-expert export (`PipelineConfig.boundary_ratio`, Wan2.2 A14B): the low-noise steps."""
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"


def save_export(
    export_dir: str,
    config: PipelineConfig,
    state_dict: dict[str, torch.Tensor],
    ema_state_dict: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write an export folder; tensors are made contiguous CPU copies (safetensors requires it)."""
    os.makedirs(export_dir, exist_ok=True)
    save_file(cpu_state(state_dict), os.path.join(export_dir, MODEL_FILE))
    if ema_state_dict is not None:
        save_file(cpu_state(ema_state_dict), os.path.join(export_dir, EMA_FILE))
    with open(os.path.join(export_dir, CONFIG_FILE), "w") as f:
        json.dump({"format_version": EXPORT_FORMAT_VERSION, **to_dict(config)}, f, indent=2)
    return export_dir


def cpu_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies of a state dict's tensors, as `safetensors.torch.save_file` takes them."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def load_export_config(export_dir: str) -> PipelineConfig:
    """The `PipelineConfig` of an export; a clear error when the folder is not one."""
    path = os.path.join(export_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{export_dir}' is not an export folder: {CONFIG_FILE} is missing")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    version = data.pop("format_version", EXPORT_FORMAT_VERSION)
    if version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this version of sora reads up to {EXPORT_FORMAT_VERSION}"
        )
    return from_dict(PipelineConfig, data)


def local_paths(config: PipelineConfig, export_dir: str) -> PipelineConfig:
    """The config with the image encoder's relative paths (the export's own copies, written by `sora convert`) made
    paths inside `export_dir`; absolute paths and configs without an image encoder are returned as they are."""
    image = config.image_encoder
    if not image.path:
        return config
    paths = {k: os.path.join(export_dir, v) for k, v in dataclasses.asdict(image).items() if v and not os.path.isabs(v)}
    return dataclasses.replace(config, image_encoder=dataclasses.replace(image, **paths))
