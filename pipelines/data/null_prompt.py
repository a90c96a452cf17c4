"""The empty prompt's embedding: what replaces a dropped caption in training models with `null_text: empty_prompt`.

Wan (and the exports `sora convert` writes from it) have no learned null condition: classifier-free guidance
contrasts with the text encoder's embedding of "", so caption dropout in training must put that embedding in
place of the caption. It is computed where the encoder is loaded anyway, once:

    sora data prepare --from-export exports/wan-1.3b ...   # writes OUT/null_prompt.safetensors beside dataset.json

and the trainer's driver reads it from the stage data (`for_training`) and ships it to the workers with the
run's config (512 x 4096 fp16 for umT5: 4 MB). Data prepared without it (or with another encoder's) makes the
driver embed "" itself in one Ray task with the recipe's text encoder: the same numbers, one more encoder load.
The file's metadata holds the encoder settings it was made with; one made with other settings is never used.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from pipelines.data.prepare.options import NULL_PROMPT as NULL_PROMPT_FILE
from sora_model.config import TextEncoderConfig

SETTINGS_KEY = "text_encoder"


def embed_null_prompt(config: TextEncoderConfig) -> dict[str, np.ndarray]:
    """{tokens (L, D) float16, mask (L,) bool, pooled (D,) float32} of "" (tokens in the data's precision)."""
    from sora_model.text import build_text_encoder

    emb = build_text_encoder(config).encode([""])
    return {
        "tokens": emb.tokens[0].float().cpu().numpy().astype(np.float16),
        "mask": emb.mask[0].cpu().numpy().astype(bool),
        "pooled": emb.pooled[0].float().cpu().numpy().astype(np.float32),
    }


def write_null_prompt(out: str, config: TextEncoderConfig) -> str:
    """Embed "" and write OUT/null_prompt.safetensors (a local folder or fsspec URI); returns its path."""
    import torch
    from safetensors.torch import save

    from pipelines.data.prepare.shards import join, put_file

    arrays = embed_null_prompt(config)
    data = save(
        {k: torch.from_numpy(v) for k, v in arrays.items()},
        metadata={SETTINGS_KEY: json.dumps(config.embedding_settings())},
    )
    path = join(out, NULL_PROMPT_FILE)
    put_file(path, lambda f: f.write(data))  # whole or absent: a resume trusts a file it finds
    return path


def read_null_prompt_at(out: str, config: TextEncoderConfig) -> bool:
    """Whether OUT (a folder or fsspec URI) holds the null prompt made with `config`'s embedding settings."""
    from pipelines.data.prepare.shards import filesystem, join

    fs, p = filesystem(join(out, NULL_PROMPT_FILE))
    if not fs.isfile(p):
        return False
    header = fs.cat_file(p, 0, 8)
    # The safetensors header (8 bytes of length, then JSON) holds the settings: no tensor is read.
    meta = json.loads(fs.cat_file(p, 8, 8 + int.from_bytes(header, "little"))).get("__metadata__", {})
    return json.loads(meta.get(SETTINGS_KEY, "{}")) == config.embedding_settings()


def read_null_prompt(root: str, config: TextEncoderConfig) -> dict[str, np.ndarray] | None:
    """The file in a prepared folder when it was made with `config`'s embedding settings; None otherwise."""
    from safetensors import safe_open

    path = os.path.join(root, NULL_PROMPT_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="np") as f:
        settings = json.loads((f.metadata() or {}).get(SETTINGS_KEY, "{}"))
        if settings != config.embedding_settings():
            return None
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not mappings


def for_training(config: TextEncoderConfig, roots: list[str], text_length: int) -> dict[str, np.ndarray]:
    """The driver: the empty prompt's embedding from the stage data, else embedded by one Ray task (Ray is up)."""
    for root in roots:
        found = read_null_prompt(root, config)
        if found is not None:
            break
    else:
        import ray

        print(
            f"[sora train] no {NULL_PROMPT_FILE} in the data for text encoder '{config.name_or_path}': embedding \"\" "
            "once (prepare with --from-export to skip this)",
            file=sys.stderr,
            flush=True,
        )
        found = ray.get(ray.remote(embed_null_prompt).options(num_cpus=1).remote(config))
    if found["tokens"].shape[0] != text_length:
        raise ValueError(
            f"the empty prompt embeds to {found['tokens'].shape[0]} tokens but the data's captions have {text_length} "
            f"(text_encoder.max_length differs from the data's); prepare with the recipe's text encoder settings"
        )
    return found


def stage_text_length(info: dict[str, Any]) -> int:
    """Caption tokens per row of a prepared dataset (its text encoder's max_length)."""
    return int(info.get("text_encoder", {}).get("max_length", 0))
