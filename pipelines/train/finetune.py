"""Fine-tuning from an export: `init_from` (a converted Wan2.1, or any run's export), fully or with LoRA adapters.

    init_from: exports/wan-1.3b          # recipe: the model and its start weights come from this export
    lora: {rank: 32}                      # optional: train peft LoRA adapters only (base frozen)

    sora train --recipe cluster/recipes/wan-1.3b-lora.yaml --data data/wan --run-dir runs/wan-lora
    sora generate --model exports/wan-1.3b --lora runs/wan-lora/export --prompt "..." --out clip.mp4
    sora export --checkpoint runs/wan-lora/ray_results/wan-1.3b-lora/checkpoint_0001000 --out merged --merge-lora

What happens where:
- the driver (`model_spec.resolve_init`, called by `parse_recipe`): the export's config.json becomes the recipe's model
  (`model.base`), and its text encoder, autoencoder and diffusion settings fill the sections the recipe leaves
  out. The workers receive that resolved recipe and never read config.json again.
- every rank (`build_model`, before `deepspeed.initialize`): the DiT is built on the meta device, rank 0 reads
  model.safetensors a tensor at a time and broadcasts each (so only rank 0's node needs the export's weights).
  Under ZeRO-3 each batch of received tensors goes straight into `deepspeed.zero.Init`, which keeps this rank's
  partition: no rank ever holds the whole model (a 14B fine-tune fits where the full fp32 model would not);
  with ZeRO-0/1/2 every rank holds it whole, as they train it. With `lora`, peft's `inject_adapter_in_model`
  wraps the targeted Linears (A random, B zero: the start model is exactly the base), and only `lora_A`/`lora_B`
  keep requires_grad; the optimizer and the EMA see only those.
- rank 0 at each export (`write_lora_export`): the adapters in peft's folder format (what `--lora` and
  `sora_model.lora.merge_lora` read), its EMA beside it in `ema/`, and with `merge_export` the merged whole
  export in `merged/`, built from the exact fp32 base weights of `init_from` (the frozen base never changed).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from sora_model.config import ConfigError, DiTConfig, to_dict

FINETUNE_FILE = "finetune.json"
"""Written into every checkpoint of an `init_from` run: the export it started from and the LoRA settings."""
LORA_MARK = ".lora_"
"""What peft puts in the names of adapter parameters (`blocks.0.attn.qkv.lora_A.default.weight`)."""
ADAPTER_NAME = "default"
EMA_SUBDIR = "ema"
MERGED_SUBDIR = "merged"
ADAPTER_KEY_PREFIX = "base_model.model."
"""peft's `save_pretrained` key prefix; `sora_model.lora.read_adapter` strips it."""


# ---------------------------------------------------------------------------------------------
# The driver: the export before any work (its model became the recipe's in model_spec.resolve_init)
# ---------------------------------------------------------------------------------------------


def check_init(recipe: Any) -> None:
    """`sora train`, before any work: an `init_from` that `resolve_init` could not read (the path does not exist),
    or whose weights do not open or do not fit the model (`check_init_weights`). One line, naming the file."""
    if recipe.init_from and recipe.model.base is None:
        raise ConfigError(
            f"init_from '{recipe.init_from}' does not exist: give an export folder (sora convert --from-diffusers DIR "
            "--out EXPORT_DIR, or a run's export/) that every node can read"
        )
    if recipe.init_from:
        check_init_weights(recipe.model_config(), recipe.init_from)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def check_init_weights(cfg: DiTConfig, export_dir: str) -> None:
    """The export's weights open and hold every tensor of the model `cfg` builds, with its shape; else a one-line
    ConfigError naming the file. Only the safetensors header is read and the model is built on the meta device,
    so the driver spends no memory on either (the workers read the tensors: rank 0, `load_init_weights`)."""
    from safetensors import safe_open

    from sora_model.dit import DiT
    from sora_model.pipeline import MODEL_FILE

    path = os.path.join(export_dir, MODEL_FILE)
    try:
        with safe_open(path, framework="pt") as f:
            # safe_open has no __iter__
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001
        # any reader error (missing, truncated, not safetensors) is the file's fault
        raise ConfigError(f"init_from: cannot read {path}: {_one_line(err)}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    problem = _misfit(expected, shapes)
    if problem:
        raise ConfigError(f"init_from: {path} does not fit its config.json's model ({problem})")


def _misfit(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """What differs between the model's tensors and a file's, as a short phrase ('' when they fit)."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    bad = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    parts = [
        f"{label} {len(items)}: {', '.join(items[:3])}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad))
        if items
    ]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Every rank: the model before deepspeed.initialize
# ---------------------------------------------------------------------------------------------


def build_model(recipe: Any, ds_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The DiT a rank trains: seeded init or the `init_from` weights, then LoRA adapters; torch.distributed up.

    From `init_from` the DiT is built on the meta device (no random init, which the weights replace) and rank 0
    reads the export tensor by tensor (`stream_init_weights`). From scratch under ZeRO-3, rank 0 builds it on the
    meta device too and replays the seeded init a tensor at a time (`seeded_init`: the same bits as `DiT(cfg)`
    after the seed). Under ZeRO-3 (`ds_config` given, stage 3) each rank then keeps only its partition
    (`_partition`): no rank ever holds the whole model; otherwise every rank holds it whole, as ZeRO-0/1/2 train it.
    """
    from sora_model.dit import DiT

    # same on every rank: identical initial weights (and adapters), which ZeRO-3 partitions
    torch.manual_seed(recipe.seed)
    cfg = recipe.model_config()
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    if not recipe.init_from and not zero3:
        model = DiT(cfg)
    elif not recipe.init_from:
        model = _partition_seeded(cfg, ds_config)
    else:
        with torch.device("meta"):
            model = DiT(cfg)
        if zero3:
            _partition(model, stream_init_weights(model, recipe.init_from, _zero3_dtype(ds_config)), ds_config)
        else:
            model.to_empty(device="cpu")
            load_init_weights(model, recipe.init_from)
    if recipe.lora is not None:
        add_lora(model, recipe.lora, recipe.seed)
        if zero3 and ds_config.get("bf16", {}).get("enabled"):
            # DeepSpeed casts no parameter of a model that ZeRO-Init partitioned: the adapters join its dtype here.
            for p in model.parameters():
                if not hasattr(p, "ds_id"):
                    p.data = p.data.to(torch.bfloat16)
    return model


def _partition_seeded(cfg: DiTConfig, ds_config: dict[str, Any]) -> torch.nn.Module:
    """From scratch under ZeRO-3: the seeded DiT as this rank's partitions. Rank 0 records the build on the meta
    device (`seeded_init.record_init`) and sends each parameter's replayed init; the other ranks build it on the
    meta device plainly. Every rank ends with the generator where `DiT(cfg)` leaves it."""
    import torch.distributed as dist

    from pipelines.train.seeded_init import record_init, stream_seeded_weights
    from sora_model.dit import DiT

    recorder = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        model, recorder = record_init(lambda: DiT(cfg))
    else:
        with torch.device("meta"):
            model = DiT(cfg)
    _partition(model, stream_seeded_weights(model, recorder, _zero3_dtype(ds_config)), ds_config)
    return model


def _broadcast_device() -> torch.device:
    """Where broadcast tensors must live: NCCL moves CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    from pipelines.train.sequence_parallel import collective_device

    return collective_device(dist.get_backend())


def _file_problem(path: str, expected: dict[str, tuple]) -> tuple[str | None, list[str]]:
    """(a one-line problem or None, the file's tensor names in file order) from the safetensors header alone."""
    from sora_model.weights_io import read_header

    try:
        header, start = read_header(path)
        end = start + max((e["data_offsets"][1] for e in header.values()), default=0)
        if os.path.getsize(path) < end:
            raise ValueError(f"{path} is truncated: {os.path.getsize(path)} bytes, its header needs {end}")
    except Exception as err:  # noqa: BLE001 - any reader error reaches every rank as one line naming the file
        return f"init_from: cannot read {path}: {_one_line(err)}", []
    misfit = _misfit(expected, {k: tuple(e["shape"]) for k, e in header.items()})
    if misfit:
        return f"init_from: {path} does not fit its config.json's model ({misfit})", []
    return None, sorted(header, key=lambda k: header[k]["data_offsets"][0])


@torch.no_grad()
def stream_init_weights(model: torch.nn.Module, export_dir: str, dtype: torch.dtype | None = None):
    """Every rank: (name, tensor) for each tensor of the export's model.safetensors, rank 0 reading the file one
    tensor at a time (`weights_io.iter_tensors`, cast to `dtype`, else to the model tensor's dtype) and broadcasting
    it; the other ranks receive into a fresh tensor. `model` gives names, shapes and dtypes only (it may be on the
    meta device). Rank 0 first broadcasts whether the file fits, so a mismatch is the same one-line error on every
    rank instead of the other ranks waiting in a broadcast that never comes."""
    import torch.distributed as dist

    from sora_model.pipeline import MODEL_FILE
    from sora_model.weights_io import iter_tensors

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    path = os.path.join(export_dir, MODEL_FILE)
    targets = {k: (tuple(v.shape), dtype or v.dtype) for k, v in model.state_dict().items()}
    message: list = [None, []]
    if rank == 0:
        message = list(_file_problem(path, {k: s for k, (s, _) in targets.items()}))
    if distributed:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(message[0])
    device = _broadcast_device() if distributed else torch.device("cpu")
    reader = iter_tensors(path, lambda name, _: targets[name][1]) if rank == 0 else None
    for name in message[1]:
        shape, dt = targets[name]
        if reader is not None:
            got, value = next(reader)
            if got != name:
                raise AssertionError(f"read '{got}' where the header gave '{name}'")
            value = value.to(device)
        else:
            value = torch.empty(shape, dtype=dt, device=device)
        if distributed:
            dist.broadcast(value, src=0)
        yield name, value


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, export_dir: str) -> None:
    """Copy the export's model.safetensors into `model` (every rank: `stream_init_weights`, one tensor in flight)."""
    state = model.state_dict()
    for name, value in stream_init_weights(model, export_dir):
        state[name].copy_(value)


PARTITION_BATCH_BYTES = 256 << 20
"""Under ZeRO-3, at most this many bytes of whole parameters are held before DeepSpeed partitions them."""


def _zero3_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype ZeRO-Init gives parameters: the engine's (bf16 when its bf16 mode is on)."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


@torch.no_grad()
def _partition(model: torch.nn.Module, tensors: Iterator, ds_config: dict[str, Any]) -> None:
    """Fill a meta-device DiT with whole tensors (name, value) as ZeRO-3 partitions: the export's weights
    (`stream_init_weights`) or the seeded init (`seeded_init.stream_seeded_weights`), which arrive from rank 0 a
    tensor at a time and, every PARTITION_BATCH_BYTES, go through `deepspeed.zero.Init(module=...)` (the first batch)
    or the converter it attaches to its parameters (the next ones: what `deepspeed.initialize` uses for parameters
    added later), which keep this rank's partition and free the rest. Parameters are in the engine's dtype
    (`_zero3_dtype`), as ZeRO-Init's are; `deepspeed.initialize` then takes the model as ZeRO-Init built."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # What `deepspeed.initialize` does first: wrap the running torch.distributed (ZeRO-Init reads its world size).
    deepspeed.comm.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False
    )
    owners = {
        f"{m}.{n}" if m else n: (module, n)
        for m, module in model.named_modules()
        for n, _ in module.named_parameters(recurse=False)
    }
    batch: list[torch.nn.Parameter] = []
    first: list[torch.nn.Parameter] = []

    def partition() -> None:
        if not first:
            holder = torch.nn.Module()
            for i, p in enumerate(batch):
                holder.register_parameter(f"p{i}", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=copy.deepcopy(ds_config))
            first.append(batch[0])
        else:
            first[0].convert_to_zero_parameters(param_list=batch)
        batch.clear()

    held = 0
    for name, value in tensors:
        module, attr = owners[name]
        param = torch.nn.Parameter(value, requires_grad=True)
        setattr(module, attr, param)
        batch.append(param)
        held += value.numel() * value.element_size()
        if held >= PARTITION_BATCH_BYTES:
            partition()
            held = 0
    if batch:
        partition()
    left = [n for n, p in model.named_parameters() if p.is_meta or not hasattr(p, "ds_id")]
    if left:
        raise AssertionError(f"the ZeRO-3 build left {left[:3]} unpartitioned")


def add_lora(model: torch.nn.Module, spec: Any, seed: int) -> list[str]:
    """Inject peft LoRA adapters into `model` in place and freeze everything else; returns the adapted modules."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.scale_alpha, target_modules=spec.targets, lora_dropout=spec.dropout
    )
    torch.manual_seed(seed)  # the A matrices are random: the same on every rank
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ConfigError(f"lora.targets {spec.targets!r}: {' '.join(str(err).split())[:300]}") from None
    adapted = sorted({n.split(LORA_MARK)[0] for n, _ in model.named_parameters() if LORA_MARK in n})
    modules = dict(model.named_modules())
    for name in adapted:
        base = getattr(modules[name], "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            raise ConfigError(
                f"lora.targets matches '{name}', a {type(base).__name__}: only Linear projections take adapters here"
            )
    for name, p in model.named_parameters():
        p.requires_grad_(LORA_MARK in name)
    return adapted


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer steps: every parameter in a full fine-tune, the adapters in a LoRA one."""
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Exports: adapter folders, merged exports
# ---------------------------------------------------------------------------------------------


def adapter_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trained parameter names -> peft's saved keys (`base_model.model.<module>.lora_A.weight`), adapters only."""
    out = {}
    for name, value in weights.items():
        if LORA_MARK not in name:
            continue
        key = name.replace(f".{ADAPTER_NAME}.weight", ".weight")
        out[ADAPTER_KEY_PREFIX + key] = value.detach().float().cpu().contiguous()
    return out


def write_adapter(folder: str, spec: Any, base: str, weights: dict[str, torch.Tensor]) -> str:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors); `base` is its base export."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from sora_model.lora import ADAPTER_WEIGHTS

    os.makedirs(folder, exist_ok=True)
    tensors = adapter_tensors(weights)
    if not tensors:
        raise ValueError("no LoRA adapter weights to export (the checkpoint or run has no lora_A/lora_B parameters)")
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.scale_alpha,
        target_modules=spec.targets,
        lora_dropout=spec.dropout,
        base_model_name_or_path=os.path.abspath(base),
    )
    config.save_pretrained(folder)  # peft's own adapter_config.json, so peft and diffusers read it too
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def merged_weights(base_export: str, adapter: str) -> dict[str, torch.Tensor]:
    """The base export's fp32 weights with an adapter folder merged in (W += alpha / r * B @ A), read a tensor at a
    time (`dit_load.load_dit`: the merged model is all that is held)."""
    from sora_model.dit_load import load_dit
    from sora_model.export_io import MODEL_FILE, load_export_config

    return load_dit(load_export_config(base_export), os.path.join(base_export, MODEL_FILE), adapter).state_dict()


def write_lora_export(
    folder: str, recipe: Any, weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor] | None
) -> str:
    """A LoRA run's export: the adapter in `folder`, its EMA in `folder/ema`, the merged export in `folder/merged`."""
    from sora_model.pipeline import save_export

    write_adapter(folder, recipe.lora, recipe.init_from, weights)
    ema_dir = os.path.join(folder, EMA_SUBDIR)
    if ema_weights is not None:
        write_adapter(ema_dir, recipe.lora, recipe.init_from, ema_weights)
    if recipe.lora.merge_export:
        merged_ema = merged_weights(recipe.init_from, ema_dir) if ema_weights is not None else None
        save_export(
            os.path.join(folder, MERGED_SUBDIR),
            recipe.pipeline_config(),
            merged_weights(recipe.init_from, folder),
            merged_ema,
        )
    return folder


def adapter_base(folder: str) -> tuple[str, str | None]:
    """(model folder, adapter folder or None): an adapter folder stands for its base export with it merged."""
    from sora_model.lora import ADAPTER_CONFIG

    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return folder, None
    with open(path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter '{folder}' does not name its base export (base_model_name_or_path)")
    return base, folder


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def write_checkpoint_info(folder: str, recipe: Any) -> None:
    """Rank 0, into each checkpoint of an `init_from` run: what `sora export` needs to rebuild a LoRA export."""
    if not recipe.init_from:
        return
    info = {"init_from": os.path.abspath(recipe.init_from), "lora": to_dict(recipe.lora) if recipe.lora else None}
    with open(os.path.join(folder, FINETUNE_FILE), "w") as f:
        json.dump(info, f, indent=2)
