"""Exact weights under ZeRO: the EMA and the export both come from the fp32 master weights.

    master = master_partitions(module)           # {name: this rank's fp32 master slice}, no communication
    ema = PartitionEMA(module, decay=0.999, warmup=True); ema.update(module, step)   # after each optimizer step
    full = gather_full(module, master, rank)      # every rank calls; rank 0 gets {name: full fp32 tensor}

Why not DeepSpeed's `GatheredParameters` and a swap: ZeRO-3 keeps parameters under
`stage3_param_persistence_threshold` whole on every rank and skips them when gathering, so EMA values
swapped into the partitions never reach the gathered copy of those; and under bf16 the gathered
parameters are bf16 copies of the fp32 masters. Here each rank's slice is read from the optimizer's
fp32 master (`safe_get_local_fp32_param`), and slices are concatenated in rank order, which is how
ZeRO-3 partitions a flattened parameter (rank r holds elements [r*p, (r+1)*p), the last slice padded).

Below ZeRO-3 every rank holds each parameter whole: its fp32 master is `safe_get_full_fp32_param`
under bf16 (a collective over the fragments ZeRO-1/2 spread across ranks) and the parameter itself in fp32.
"""

from __future__ import annotations

import json
from typing import Any

import torch

LAYOUT_PARTITION = "partition"
LAYOUT_FULL = "full"


def _collective_device() -> torch.device:
    """Where tensors must be for the default process group's collectives (its backend decides, not the tensors:
    with `offload_optimizer` the fp32 masters are CPU tensors, which NCCL cannot move)."""
    import torch.distributed as dist

    from pipelines.train.sequence_parallel import collective_device

    return collective_device(dist.get_backend()) if dist.is_initialized() else torch.device("cpu")


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def master_partitions(module: torch.nn.Module, bf16: bool = False) -> dict[str, torch.Tensor]:
    """{name: fp32 master weights this rank holds}: a flat ZeRO-3 slice, or the whole tensor below stage 3.

    Views into the optimizer's buffers (no copy): clone what must outlive the next step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if is_zero3(p):
            local = safe_get_local_fp32_param(p) if p.requires_grad else None
            out[name] = local if local is not None else p.ds_tensor.detach().float()
        elif bf16 and p.requires_grad:
            out[name] = safe_get_full_fp32_param(p)
        else:
            out[name] = p.detach().float()
    return out


def _full_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {n: list(p.ds_shape if is_zero3(p) else p.shape) for n, p in module.named_parameters()}


def assemble(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """One parameter from its ZeRO-3 slices in rank order: concatenate, drop the padding, reshape."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.cat([p.reshape(-1) for p in parts])[:numel].view(shape).clone()


def partition_of(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a full parameter (what `assemble` inverts)."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world)
    padded = torch.zeros(size * world, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[rank * size : (rank + 1) * size].clone()


@torch.no_grad()
def gather_full(
    module: torch.nn.Module, partitions: dict[str, torch.Tensor], rank: int
) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU tensors on rank 0 (None elsewhere) from per-rank master slices (of the parameters `partitions`
    names, in the module's order); every rank calls it."""
    import torch.distributed as dist

    shapes = _full_shapes(module)
    world = dist.get_world_size() if dist.is_initialized() else 1
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    wire = _collective_device()
    for name, p in module.named_parameters():
        if name not in partitions:  # e.g. a LoRA run's frozen base: the export takes it from init_from
            continue
        local = partitions[name].detach().float().reshape(-1)
        if not is_zero3(p) or world == 1:
            if out is not None:
                out[name] = assemble([local.cpu()], shapes[name])
            continue
        local = local.to(wire)  # offloaded masters live on the host; NCCL gathers CUDA tensors only
        bucket = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, gather_list=bucket, dst=0)
        if out is not None:
            out[name] = assemble([b.cpu() for b in bucket], shapes[name])
    return out


class PartitionEMA:
    """EMA of the fp32 master weights, kept per rank on the slice that rank owns (no communication per step)."""

    def __init__(self, module: torch.nn.Module, decay: float, bf16: bool = False, warmup: bool = False):
        self.decay = decay
        self.bf16 = bf16
        self.warmup = warmup
        # Only what trains: a LoRA run's frozen base never moves, and averaging it would hold a second copy of it.
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {
            n: t.detach().float().clone() for n, t in master_partitions(module, bf16).items() if n in self.trainable
        }
        self.layout = LAYOUT_PARTITION if any(is_zero3(p) for p in module.parameters()) else LAYOUT_FULL
        self.shapes = _full_shapes(module)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based); with warm-up min(decay, (1 + n) / (10 + n)),
        n = step - 1, so the first update keeps only a tenth of the initial weights."""
        if not self.warmup:
            return self.decay
        n = max(0, step - 1)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int = 0) -> None:
        """Average in the masters after optimizer step `step` (the run's global step: a resumed run goes on with the
        decay the uninterrupted one would have used)."""
        decay = self.decay_at(step)
        for n, master in master_partitions(module, self.bf16).items():
            if n not in self.shadow:
                continue
            self.shadow[n].lerp_(master.detach().float().to(self.shadow[n].device), 1.0 - decay)

    def save(self, path: str) -> None:
        """This rank's slices, with the full shapes and layout so another world size can re-slice them."""
        from safetensors.torch import save_file

        meta = {"layout": self.layout, "shapes": json.dumps(self.shapes)}
        save_file({n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}, path, metadata=meta)

    def load(self, path: str) -> None:
        """Restore from this rank's file of a checkpoint written by the same number of ranks."""
        from safetensors.torch import load_file

        state = load_file(path)
        for n, t in self.shadow.items():
            if state[n].shape != t.shape:
                raise ValueError(f"EMA slice of {n} has shape {tuple(state[n].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[n])

    def load_full(self, full: dict[str, torch.Tensor], rank: int, world: int) -> None:
        """Restore from full tensors (a checkpoint of another world size): take this rank's slices."""
        for n, t in self.shadow.items():
            src = full[n].float()
            t.copy_(partition_of(src, rank, world) if self.layout == LAYOUT_PARTITION else src.reshape(t.shape))


def read_ema_files(paths: list[str]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from every rank's file of one checkpoint (`ema/rank<r>.safetensors`, in rank order)."""
    from safetensors import safe_open

    slices: dict[str, list[torch.Tensor]] = {}
    meta: dict[str, Any] = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                slices.setdefault(name, []).append(f.get_tensor(name))
    if "shapes" not in meta:
        raise ValueError(f"{paths[0]} has no shape metadata (an EMA file from before portable checkpoints)")
    shapes = json.loads(meta["shapes"])
    if meta.get("layout") == LAYOUT_FULL:
        return {n: parts[0].reshape(shapes[n]).clone() for n, parts in slices.items()}
    return {n: assemble(parts, shapes[n]) for n, parts in slices.items()}


@torch.no_grad()
def weights_digest(module: torch.nn.Module, bf16: bool = False) -> dict[str, float]:
    """{name: sum of the full fp32 master tensor}, from slice sums and one all-reduce (every rank calls it).

    Recorded in workers.json when an attempt starts: it shows which weights a run (re)started from
    without gathering the model anywhere (ZeRO pads slices with zeros, which add nothing).
    """
    import torch.distributed as dist

    masters = master_partitions(module, bf16)
    names = list(masters)
    sums = torch.tensor([float(masters[n].double().sum()) for n in names], dtype=torch.float64)
    partitioned = any(is_zero3(p) for p in module.parameters())
    if partitioned and dist.is_initialized() and dist.get_world_size() > 1:
        # not the masters' device: offloaded ones live on the host, NCCL wants CUDA
        sums = sums.to(_collective_device())
        dist.all_reduce(sums)
    return dict(zip(names, sums.cpu().tolist()))
