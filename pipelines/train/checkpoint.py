"""Checkpoints: what every rank writes, how a run resumes (with any number of ranks), and offline export.

A checkpoint folder (`RUN/ray_results/<name>/checkpoint_<step>/`, merged by Ray Train from every rank):

    ds/                      DeepSpeed's ZeRO files, one pair per rank (fp32 master slices, optimizer state)
    ema/rank<r>.safetensors  each rank's EMA slices, with the full shapes in the metadata
    rng/rank<r>.json         RNG states
    trainer_state.json       position: stage, step in stage, global step, samples of the stage stream drawn
    config.json              the pipeline config: what an export from this checkpoint needs besides weights
    universal/               only after a resume with another number of ranks: DeepSpeed's universal
                             checkpoint (per-parameter fp32 weights and Adam moments) and ema.safetensors

    sora export --checkpoint RUN/ray_results/NAME/checkpoint_0000120 --out export120 [--ema]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from sora_model.export_io import CONFIG_FILE  # a checkpoint folder holds its export's config too

TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"
"""DeepSpeed checkpoint tag: one fixed name, since each Ray checkpoint folder holds exactly one."""
UNIVERSAL_DIR = "universal"
EMA_DIR = "ema"
EMA_FULL = "ema.safetensors"
RNG_DIR = "rng"


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        # Each step's noise comes from its own generator (step.step_seed); the global states cover anything else.
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


def read_state(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
        return json.load(f)


def write_rank_files(folder: str, engine: Any, ema: Any, rank: int) -> None:
    """This rank's part of a checkpoint into a local folder (Ray Train merges the ranks' folders)."""
    engine.save_checkpoint(folder, tag=DS_TAG)
    os.makedirs(os.path.join(folder, RNG_DIR), exist_ok=True)
    with open(os.path.join(folder, RNG_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(rng_state(), f)
    if ema is not None:
        os.makedirs(os.path.join(folder, EMA_DIR), exist_ok=True)
        ema.save(os.path.join(folder, EMA_DIR, f"rank{rank}.safetensors"))


def write_rank0_files(folder: str, state: dict[str, Any], pipeline_config: dict[str, Any]) -> None:
    with open(os.path.join(folder, TRAINER_STATE), "w") as f:
        json.dump(state, f, indent=2)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(pipeline_config, f, indent=2)


def restore(engine: Any, ema: Any, ckpt_dir: str, rank: int, world: int) -> dict[str, Any]:
    """Load weights, optimizer, schedule, EMA and RNG into this rank; returns the saved position.

    A checkpoint from another number of ranks is read from its universal form (made by
    `make_portable` on the driver before the workers start); the engine must have been built with
    `checkpoint.load_universal` for it.
    """
    saved = read_state(ckpt_dir)
    if saved["world_size"] == world:
        engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if ema is not None:
            ema.load(os.path.join(ckpt_dir, EMA_DIR, f"rank{rank}.safetensors"))
    else:
        universal = os.path.join(ckpt_dir, UNIVERSAL_DIR)
        if not os.path.isdir(os.path.join(universal, DS_TAG)):
            raise RuntimeError(
                f"the checkpoint was written by {saved['world_size']} workers and has no universal form for {world}; "
                "resume through `sora train --resume` (it converts the checkpoint first)"
            )
        engine.load_checkpoint(universal, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_full(load_file(os.path.join(universal, EMA_FULL)), rank, world)
    rng = os.path.join(ckpt_dir, RNG_DIR, f"rank{rank}.json")
    if os.path.isfile(rng):  # a rank the old run did not have starts from its seed; steps reseed anyway
        with open(rng) as f:
            set_rng_state(json.load(f))
    return saved


def _ema_files(ckpt_dir: str) -> list[str]:
    folder = os.path.join(ckpt_dir, EMA_DIR)
    if not os.path.isdir(folder):
        return []
    ranks = sorted(int(n[4:-12]) for n in os.listdir(folder) if n.startswith("rank") and n.endswith(".safetensors"))
    return [os.path.join(folder, f"rank{r}.safetensors") for r in ranks]


def convert_to_universal(ckpt_dir: str) -> str:
    """Write `ckpt_dir/universal/` (DeepSpeed's universal checkpoint + full EMA); returns its path."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver may be a CPU head node
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from safetensors.torch import save_file

    from pipelines.train.ema import read_ema_files

    universal = os.path.join(ckpt_dir, UNIVERSAL_DIR)
    tmp = universal + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = _universal_args(os.path.join(ckpt_dir, DS_TAG), os.path.join(tmp, DS_TAG))
    ds_to_universal(args)
    ema_files = _ema_files(ckpt_dir)
    if ema_files:
        save_file(read_ema_files(ema_files), os.path.join(tmp, EMA_FULL))
    shutil.rmtree(universal, ignore_errors=True)
    os.replace(tmp, universal)
    return universal


def _universal_args(input_folder: str, output_folder: str) -> Any:
    import argparse

    return argparse.Namespace(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )


def make_portable(store: Any, ckpt_rel: str, world: int) -> bool:
    """Give a checkpoint a universal form when `world` ranks will load it and it was written by others.

    Runs on the driver, once per resume; on object storage the checkpoint is converted in a temp folder
    and `universal/` uploaded beside it. Returns True when it converted.
    """
    if store.remote:
        tmp = tempfile.mkdtemp(prefix="sora-universal-")
        try:
            local = store.download(ckpt_rel, os.path.join(tmp, "ckpt"))
            if read_state(local)["world_size"] == world or os.path.isdir(os.path.join(local, UNIVERSAL_DIR, DS_TAG)):
                return False
            store.upload(convert_to_universal(local), f"{ckpt_rel}/{UNIVERSAL_DIR}")
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    local = store.url(ckpt_rel)
    if read_state(local)["world_size"] == world or os.path.isdir(os.path.join(local, UNIVERSAL_DIR, DS_TAG)):
        return False
    convert_to_universal(local)
    return True


def fp32_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of a checkpoint, from the ZeRO files of every rank (no GPU, no Ray)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=DS_TAG)
    return {k: v.float().contiguous() for k, v in state.items()}


def ema_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The full EMA tensors of a checkpoint (every rank's slices); FileNotFoundError when it holds none."""
    from pipelines.train.ema import read_ema_files

    files = _ema_files(ckpt_dir)
    if not files:
        raise FileNotFoundError(f"{ckpt_dir} holds no EMA (the recipe had ema.enabled false); export without --ema")
    return read_ema_files(files)


def export_checkpoint(ckpt_dir: str, out_dir: str, ema: bool = False, merge_lora: bool = False) -> str:
    """`sora export`: an export folder (model.safetensors, config.json, + ema.safetensors) from a checkpoint.

    A LoRA run's checkpoint gives its adapter folder (+ `ema/`), or with `merge_lora` the merged whole export."""
    from pipelines.train.finetune import FINETUNE_FILE
    from sora_model.config import PipelineConfig, from_dict
    from sora_model.pipeline import save_export

    if not os.path.isfile(os.path.join(ckpt_dir, TRAINER_STATE)) or not os.path.isdir(os.path.join(ckpt_dir, DS_TAG)):
        raise FileNotFoundError(f"{ckpt_dir} is not a training checkpoint (no {TRAINER_STATE} and {DS_TAG}/ inside)")
    if not os.path.isfile(os.path.join(ckpt_dir, CONFIG_FILE)):
        raise FileNotFoundError(f"{ckpt_dir} has no {CONFIG_FILE} (written by training since portable checkpoints)")
    finetune = os.path.join(ckpt_dir, FINETUNE_FILE)
    lora = False
    if os.path.isfile(finetune):
        with open(finetune) as f:
            lora = json.load(f).get("lora") is not None
    if lora:
        return export_lora_checkpoint(ckpt_dir, out_dir, ema=ema, merge=merge_lora)
    if merge_lora:
        raise ValueError(f"{ckpt_dir} is not from a LoRA run (no adapters to merge); export without --merge-lora")
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        config = from_dict(PipelineConfig, json.load(f))
    return save_export(out_dir, config, fp32_weights(ckpt_dir), ema_weights(ckpt_dir) if ema else None)


def export_lora_checkpoint(ckpt_dir: str, out_dir: str, ema: bool, merge: bool) -> str:
    """`sora export` of a LoRA checkpoint: the adapter folder, or with `merge` the merged whole export."""
    from pipelines.train.finetune import EMA_SUBDIR, FINETUNE_FILE, merged_weights, write_adapter
    from pipelines.train.recipe import LoraSpec
    from sora_model.config import PipelineConfig, from_dict
    from sora_model.pipeline import save_export

    with open(os.path.join(ckpt_dir, FINETUNE_FILE)) as f:
        info = json.load(f)
    spec = from_dict(LoraSpec, info["lora"], "lora")
    weights = fp32_weights(ckpt_dir)
    averaged = ema_weights(ckpt_dir) if ema else None
    if not merge:
        write_adapter(out_dir, spec, info["init_from"], weights)
        if averaged is not None:
            write_adapter(os.path.join(out_dir, EMA_SUBDIR), spec, info["init_from"], averaged)
        return out_dir
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        config = from_dict(PipelineConfig, json.load(f))
    with tempfile.TemporaryDirectory(prefix="sora-adapter-") as tmp:
        merged = merged_weights(
            info["init_from"], write_adapter(os.path.join(tmp, "a"), spec, info["init_from"], weights)
        )
        merged_ema = None
        if averaged is not None:
            merged_ema = merged_weights(
                info["init_from"], write_adapter(os.path.join(tmp, "e"), spec, info["init_from"], averaged)
            )
    return save_export(out_dir, config, merged, merged_ema)
