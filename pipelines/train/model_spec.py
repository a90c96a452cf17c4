"""The recipe's model: a named preset with overrides, or the model of an export (`init_from`), resolved on the driver.

    model: {preset: DiT-demo, overrides: {gradient_checkpointing: true}}     # a preset
    init_from: exports/wan-1.3b                                             # the export's model (finetune.py)

`parse_recipe` (recipe.py) calls `resolve_init` on a mapping with `init_from`: the export's config.json becomes the
recipe's `model.base`, and its text encoder, autoencoder, diffusion (and image encoder) settings fill the sections
the recipe leaves out. The workers receive that resolved recipe and never read config.json again. This module sits
below recipe.py and finetune.py and imports neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sora_model.config import ConfigError, DiTConfig, dit_preset, from_dict, to_dict

RUNTIME_FIELDS = ("gradient_checkpointing",)
"""Model options a fine-tune may change: they change how the step runs, never the weights or the outputs."""


@dataclass
class ModelSpec:
    """A named preset (`sora_model.config.DIT_PRESETS`) with field overrides."""

    preset: str = "DiT-demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any `DiTConfig` field, e.g. `{patch_size: [1, 4, 4], gradient_checkpointing: true}`; typed like the config."""
    base: DiTConfig | None = None
    """A whole model config to start from instead of the preset. With `init_from` the export's, filled in when the
    recipe is read (`resolve_init`); overrides then may only set runtime options (gradient_checkpointing)."""

    def build(self) -> DiTConfig:
        base = to_dict(self.base if self.base is not None else dit_preset(self.preset))
        # Round-trip through from_dict so overrides are checked (names and types) like any other key.
        return from_dict(DiTConfig, {**base, **self.overrides}, "model.overrides")


def _effective(cfg: DiTConfig) -> dict[str, Any]:
    """The settings that decide weights and outputs (rope_split None spelled out; runtime options left out)."""
    from sora_model.rope import rope_split

    out = to_dict(cfg)
    try:
        out["rope_split"] = list(rope_split(cfg.head_dim, cfg.rope_split))
    except ValueError:  # a split that does not fit this width: left as written, it differs anyway
        pass
    for key in RUNTIME_FIELDS:
        out.pop(key)
    return out


def resolve_init(data: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe mapping with `init_from` -> the same with the export's model (and omitted sections) filled in.

    The recipe's `model:` must be omitted, or agree with the export but for RUNTIME_FIELDS; one-line ConfigError
    otherwise. A mapping resolved before (what the workers receive: `model.base` set) is returned as it is.
    """
    from sora_model.pipeline import MODEL_FILE, load_export_config

    path = data["init_from"]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"init_from must be an export folder (a path), got {path!r}")
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping, got {type(model).__name__}")
    if model.get("base") is not None:
        return data
    if not os.path.exists(path):
        # not on this machine (a shipped recipe names a cluster path): parsing defers to `check_init`, which fails
        # `sora train` in one line
        return data
    try:
        export = load_export_config(path)
    except (OSError, ValueError) as err:  # ConfigError is a ValueError: a bad config.json names its key
        raise ConfigError(f"init_from: {' '.join(str(err).split())}") from None
    if not os.path.isfile(os.path.join(path, MODEL_FILE)):
        raise ConfigError(
            f"init_from '{path}' has no {MODEL_FILE}: give an export folder (sora convert or a run's export/)"
        )
    unknown = sorted(set(model) - {"preset", "overrides"})
    if unknown:
        raise ConfigError(f"unknown key 'model.{unknown[0]}' (allowed with init_from: preset, overrides)")
    overrides = model.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.overrides must be a mapping, got {type(overrides).__name__}")
    if "preset" in model:
        ours = from_dict(ModelSpec, {"preset": model["preset"], "overrides": overrides}, "model").build()
    else:
        ours = from_dict(DiTConfig, {**to_dict(export.model), **overrides}, "model.overrides")
    mine, theirs = _effective(ours), _effective(export.model)
    for key, value in mine.items():
        if value != theirs[key]:
            raise ConfigError(
                f"model.{key} is {value!r} but init_from '{path}' has {theirs[key]!r}; omit model: (the export's "
                f"config.json gives the model) or set only {', '.join(RUNTIME_FIELDS)} in model.overrides"
            )
    runtime = {key: value for key, value in overrides.items() if key in RUNTIME_FIELDS}
    # Absolute: the workers run in other folders (and `ray job submit` sends the recipe from the submitting machine).
    out = {**data, "init_from": os.path.abspath(path), "model": {"base": to_dict(export.model), "overrides": runtime}}
    for key in ("text_encoder", "autoencoder", "diffusion"):
        if out.get(key) is None:
            out[key] = to_dict(getattr(export, key))
    return out


def init_image_encoder(data: dict[str, Any]) -> dict[str, Any]:
    """An `init_from` image-to-video export's image encoder for a recipe that leaves `image_encoder` out, its paths
    made absolute (the export records them relative to itself; the workers run elsewhere)."""
    from sora_model.pipeline import load_export_config

    path = data["init_from"]
    if not os.path.isdir(path):
        return data  # reported by `finetune.check_init`
    encoder = load_export_config(path).image_encoder
    if not encoder.path:
        return data
    root = os.path.abspath(path)
    absolute = {k: (v if not v or os.path.isabs(v) else os.path.join(root, v)) for k, v in to_dict(encoder).items()}
    return {**data, "image_encoder": absolute}
