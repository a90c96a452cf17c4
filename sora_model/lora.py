"""LoRA adapters on the DiT: which projections they target, and merging an adapter folder into the weights.

An adapter folder is what peft's `save_pretrained` writes: `adapter_config.json` (rank, alpha, rsLoRA, patterns)
and `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` and `.lora_B.weight`). Its module
names may be ours (an adapter trained on this DiT, `LORA_TARGET_MODULES`) or those of diffusers'
WanTransformer3DModel (an adapter trained on Wan with diffusers or peft: `blocks.0.attn1.to_q`, also under
diffusers' `transformer.` prefix); the latter land through the converter's name map, q/k/v in their slice of
our fused projections. Merging is W += scale * B @ A with scale = alpha / r (alpha / sqrt(r) for rsLoRA), in
fp32: inference then costs what the base model costs. Reading is JSON and safetensors only.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .convert_wan import output_row_order, wan_linear_target

LORA_TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(0|2))"
"""peft `target_modules` (a regex on module names) for every block's attention projections (self: fused q/k/v
and output; cross: q, fused k/v and output) and MLP projections: where LoRA fine-tuning of video DiTs puts
adapters (diffusers' and DiffSynth's Wan recipes target the same projections)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIXES = ("base_model.model.", "transformer.")
"""What peft (`save_pretrained`) and diffusers (`save_lora_weights`) put before module names."""
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """peft's rank/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return float(value)
    return default


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module name: (A (r, in), B (out, r))}) of a peft LoRA folder; one-line errors."""
    root = Path(folder)
    if not (root / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"LoRA adapter '{folder}' not found: give a folder with {ADAPTER_CONFIG} (peft save_pretrained)")
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"LoRA adapter '{folder}' has no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    config = json.loads((root / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter '{folder}' is a {config.get('peft_type')} adapter; only LoRA merges into the DiT")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"adapter '{folder}' sets {flag}, which merging does not support")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(root / ADAPTER_WEIGHTS)).items():
        for prefix in KEY_PREFIXES:
            key = key.removeprefix(prefix)
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"adapter '{folder}' holds '{key}', which is not a LoRA A/B weight of a Linear")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    incomplete = [name for name, ab in pairs.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"adapter '{folder}' has lora_A without lora_B (or the reverse) for {incomplete[0]}")
    return config, {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, folder: str | Path) -> list[str]:
    """Merge a LoRA adapter folder into `model` (a DiT) in place; returns the names of the changed modules.

    Each adapter module is one of the model's Linears or a Wan transformer Linear (`convert_wan`): a q, k or v
    adapter changes its rows of the fused projection, an output-projection adapter is reordered like the weights.
    """
    config, pairs = read_adapter(folder)
    modules = dict(model.named_modules())
    cfg = getattr(model, "cfg", None)
    changed = []
    for name, (a, b) in pairs.items():
        rows: slice | torch.Tensor | None = None
        target_name = name
        if not isinstance(modules.get(name), nn.Linear):
            target = wan_linear_target(name)
            if target is None or not isinstance(modules.get(target[0]), nn.Linear):
                raise ValueError(f"adapter '{folder}' targets '{name}', which is no Linear of this DiT nor of a Wan transformer")
            target_name, part, _ = target
            rows = slice(part * b.shape[0], (part + 1) * b.shape[0])
            if target_name == "final_layer.linear" and cfg is not None:
                rows = output_row_order(cfg.patch_size, cfg.in_channels)
        weight = modules[target_name].weight
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, float(config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        delta = scale * (b.float() @ a.float())  # (out, in)
        if isinstance(rows, torch.Tensor):
            delta = delta[rows]  # Wan's output rows in our patch order
            rows = None
        view = weight if rows is None else weight[rows]
        if tuple(view.shape) != tuple(delta.shape):
            raise ValueError(f"adapter '{folder}': {name} gives a {tuple(delta.shape)} update for a {tuple(view.shape)} weight")
        view.add_(delta.to(weight.dtype))
        changed.append(target_name)
    return sorted(set(changed))
