"""What decides a clip besides its request: the export's weights, a merged LoRA, the precision and the per-request
adapters, each named by a digest of its files. The generator computes it once at load (`Generator.identity`), and the
result cache keys on it (api.result_cache_key), so replacing a file under the same name misses the cache."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .config import ServeSettings

DIGEST_CHUNK = 8 << 20


def files_digest(paths: list[str]) -> str:
    """sha256 over the files' names and bytes, in order: what identifies an export or an adapter."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: str, suffixes: tuple[str, ...] = (".json", ".safetensors", ".bin")) -> str:
    """The digest of a model folder's config and weight files (an export, a LoRA adapter)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(suffixes) and os.path.isfile(os.path.join(folder, n)))
    return files_digest([os.path.join(folder, n) for n in names])


def path_digest(path: str) -> str:
    """The digest of an adapter: a folder's config and weight files, or one file."""
    return folder_digest(path) if os.path.isdir(path) else files_digest([path])


def model_identity(settings: ServeSettings, adapters: list[str]) -> dict[str, Any]:
    """`{weights, lora, precision, adapters}` of what `settings` serves; `adapters` are the usable `loras:` names.
    A remote export (a URI) is named by its URI."""
    lora = settings.lora
    return {
        "weights": folder_digest(settings.model) if "://" not in settings.model else settings.model,
        "lora": None if lora is None else f"{os.path.basename(os.path.normpath(lora))}:{folder_digest(lora)}",
        "precision": settings.precision,
        "adapters": {n: path_digest(settings.loras[n]) for n in adapters},
    }
