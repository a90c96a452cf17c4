"""The output's state: what a run may overwrite, whether it resumes an interrupted one, what tasks share."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.data.prepare.options import (
    DATASET_INFO,
    DECODE_REJECTS_DIR,
    NULL_PROMPT,
    REJECTS,
    RUN_STATE,
    STATS_LOG,
    Bucket,
    PrepareError,
)
from pipelines.data.prepare.shards import DAMAGED_DIR, filesystem, join, put_file


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _is_bucket_name(name: str) -> bool:
    try:
        Bucket.parse(name)
    except PrepareError:
        return False
    return True


def prepare_output(out: str, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create or check OUT (a folder or a URI); True when resuming an interrupted run with the same settings."""
    fs, root = filesystem(out)
    if fs.isfile(root):
        raise PrepareError(f"--out {out} is a file, not a folder")
    entries = fs.ls(root, detail=True) if fs.isdir(root) else []
    if not entries:
        fs.makedirs(root, exist_ok=True)
        return False
    ours, others = [], []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        fixed = name in (DATASET_INFO, RUN_STATE, REJECTS, STATS_LOG, DECODE_REJECTS_DIR, DAMAGED_DIR, NULL_PROMPT)
        bucket = e["type"] == "directory" and _is_bucket_name(name)
        (ours if fixed or bucket else others).append((name, e))
    names = {n for n, _ in ours}
    complete = DATASET_INFO in names
    if not complete and RUN_STATE not in names:
        raise PrepareError(f"--out {out} exists and is not a prepared dataset; choose an empty or new folder")
    if overwrite:
        if others:
            listed = ", ".join(n for n, _ in others[:3])
            raise PrepareError(f"refusing to --overwrite {out}: it holds files prepare did not write ({listed})")
        for _, e in ours:
            fs.rm(e["name"], recursive=e["type"] == "directory")
        return False
    if complete:
        raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    try:
        previous = read_json(join(out, RUN_STATE))
    except (OSError, json.JSONDecodeError):
        previous = {}
    if previous.get("settings_hash") != settings_hash(settings):
        before = previous.get("settings", {})
        # Keys of either run: a flag turned on or off differs too.
        changed = [k for k in dict.fromkeys([*settings, *before]) if before.get(k) != settings.get(k)]
        raise PrepareError(
            f"{out} holds an interrupted run with other settings ({', '.join(changed) or 'unknown'} differ); "
            "re-run with the same options to resume, or pass --overwrite"
        )
    return True


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def write_json(path: str, obj: Any) -> None:
    text = (json.dumps(obj, indent=2) + "\n").encode()
    put_file(path, lambda f: f.write(text))


_SHARED: dict[str, Any] = {}
"""Per worker process: objects a run shares with its tasks (manifest scan, resume filter), fetched once."""


def shared(ref: Any) -> Any:
    """The value behind an ObjectRef, fetched from the object store once per process and run."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _SHARED:
        if len(_SHARED) > 8:
            _SHARED.clear()  # earlier runs' objects
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]
