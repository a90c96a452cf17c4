"""The output folder's state: what a run may overwrite, and whether it resumes an interrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.data.prepare.options import DATASET_INFO, DECODE_REJECTS_DIR, REJECTS, RUN_STATE, STATS_LOG, Bucket, PrepareError


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _owned_entries(out: Path) -> tuple[list[Path], list[Path]]:
    """(ours, others) among OUT's entries: ours are the files and bucket folders a prepare run writes."""
    ours, others = [], []
    for p in out.iterdir():
        fixed = p.name in (DATASET_INFO, RUN_STATE, REJECTS, STATS_LOG, DECODE_REJECTS_DIR)
        bucket = p.is_dir() and _is_bucket_name(p.name)
        (ours if fixed or bucket else others).append(p)
    return ours, others


def _is_bucket_name(name: str) -> bool:
    try:
        Bucket.parse(name)
    except PrepareError:
        return False
    return True


def _prepare_output(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create or check OUT; returns True when resuming an interrupted run with the same settings."""
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return False
    if not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    ours, others = _owned_entries(out)
    complete = (out / DATASET_INFO).exists()
    state_path = out / RUN_STATE
    if not complete and not state_path.exists():
        raise PrepareError(f"--out {out} exists and is not a prepared dataset; choose an empty or new folder")
    if overwrite:
        if others:
            names = ", ".join(p.name for p in others[:3])
            raise PrepareError(f"refusing to --overwrite {out}: it holds files prepare did not write ({names})")
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return False
    if complete:
        raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    try:
        previous = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        previous = {}
    if previous.get("settings_hash") != _settings_hash(settings):
        changed = [k for k in settings if previous.get("settings", {}).get(k) != settings[k]]
        raise PrepareError(
            f"{out} holds an interrupted run with other settings ({', '.join(changed) or 'unknown'} differ); "
            "re-run with the same options to resume, or pass --overwrite"
        )
    return True


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
