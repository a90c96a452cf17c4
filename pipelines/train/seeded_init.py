"""A DiT's seeded random init, one tensor at a time: training from scratch under ZeRO-3 in bounded memory.

`DiT(cfg)` after `torch.manual_seed(seed)` draws every parameter from the CPU generator: each Linear and Conv3d
draws its default init while the model is built, then `DiT.initialize_weights` overwrites them (Xavier, small
normals, zeros). A value depends on the generator's state at its draw, so on every draw before it. To give ZeRO-3
ranks only their partition of exactly those weights, rank 0 builds the DiT on the meta device under
`InitRecorder`, a dispatch mode that sees every tensor operation of `DiT.__init__` as it runs:

- a random operation (`uniform_`, `normal_`, `randn`, ...) is also run on a CPU scratch tensor of the same shape,
  strides and dtype, so the real generator advances exactly as in the eager build, and its state before the draw
  is kept (5 KB);
- for each tensor storage: the factory that made it (`empty`, `zeros`, ...) and the writes to it (random draws,
  `zero_`, `fill_`), with the view they wrote through. A write that covers the whole storage and reads nothing
  (`PURE_WRITES`) makes the earlier ones moot: they are dropped.

`materialize` then makes one parameter on the CPU: the factory, then each write replayed on the same view from its
kept generator state. Same kernel, same tensor geometry, same generator state: the same bits as the eager build,
whatever the model's code does, as long as it uses only these operations. Anything else on a parameter (a copy,
arithmetic, a random operation that reads another tensor or takes its own generator) is not replayed: `problem`
names it, and `build_model` stops with one line on every rank. After the replay the generator is left where the
eager build leaves it, and every rank gets that state, so whatever draws next draws the same numbers as before.

Why not `deepspeed.zero.Init` around `DiT(cfg)`: it creates the parameters on the accelerator, so on a GPU the
default inits would draw from the CUDA generator and leave the CPU one behind, giving other weights than the
CPU-built model of a ZeRO-0/1/2 run (or of any run before); and `initialize_weights` runs when the children are
already partitioned, so it would need the whole model gathered (or a copy of its logic). Here `sora_model` stays as
it is and rank 0 holds at most one parameter at a time beyond its own partition (`finetune._partition` hands the
tensors to ZeRO-3 as `init_from`'s weights are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
PURE_WRITES = {aten.uniform_.default, aten.normal_.default, aten.zero_.default, aten.fill_.Scalar}
"""In-place operations whose result does not depend on the tensor's contents (only on the generator's state)."""
CPU = torch.device("cpu")


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    rng: torch.Tensor | None  # the CPU generator's state before a random operation
    view: tuple | None = None  # (size, stride, offset) written through; None for the factory


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _covers(t: torch.Tensor) -> bool:
    nbytes = t.untyped_storage().nbytes()
    return t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == nbytes


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments `func` writes into (its schema's `Tensor(a!)`)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
            out.append(value)
    return out


class InitRecorder(TorchDispatchMode):
    """Records how each tensor built under it got its value, advancing the CPU generator as the eager build does."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, list[_Op]] = {}
        self.unknown: dict[int, str] = {}  # storage -> the operation that made or changed it beyond replay
        self.end_rng: torch.Tensor | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        rng = self._advance(func, args, kwargs, written) if seeded else None
        replayable = not seeded or rng is not None
        how = str(func) if replayable else f"{func}, which reads a tensor or its own generator"
        out = func(*args, **kwargs)
        inputs = {_key(t) for t in _tensors((args, kwargs))}
        for t in written:
            k = _key(t)
            if replayable and func in PURE_WRITES and t is args[0] and k in self.history:
                op = _Op(func, args[1:], kwargs, rng, (tuple(t.shape), tuple(t.stride()), t.storage_offset()))
                self.history[k] = [self.history[k][0], op] if _covers(t) else [*self.history[k], op]
            else:
                self.history.pop(k, None)
                self.unknown[k] = how
        if not written:
            for t in _tensors(out):
                k = _key(t)
                if k in inputs:
                    continue  # a view
                self.history.pop(k, None)
                self.unknown.pop(k, None)
                if inputs or not replayable:
                    self.unknown[k] = how
                else:
                    self.history[k] = [_Op(func, args, kwargs, rng)]
        return out

    @staticmethod
    def _advance(func: Any, args: tuple, kwargs: dict, written: list[torch.Tensor]) -> torch.Tensor | None:
        """Run the random operation `func` on CPU scratch (advancing the generator as the eager build does);
        returns the generator's state before it, or None for one that reads a tensor or takes its own generator
        (not replayed: the tensors it makes or writes are named by `problem`, on every rank)."""
        others = [t for t in _tensors((args, kwargs)) if not any(t is w for w in written)]
        if others or kwargs.get("generator") is not None or len(written) > 1 or (written and written[0] is not args[0]):
            return None
        rng = torch.get_rng_state()
        if written:
            t = written[0]
            func(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=CPU), *args[1:], **kwargs)
        else:
            func(*args, **{**kwargs, "device": CPU})
        return rng

    def problem(self, named: dict[str, torch.Tensor]) -> str | None:
        """One line naming the first tensor of `named` whose value cannot be replayed, or None."""
        for name, t in named.items():
            k = _key(t)
            if k not in self.history:
                how = self.unknown.get(k, "an operation outside the build")
                return f"the seeded init of '{name}' cannot be replayed one tensor at a time (made by {how})"
        return None

    @torch.no_grad()
    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        """The value the eager build gives the meta tensor `t` (fp32 as built), on the CPU. Moves the generator:
        set `end_rng` afterwards to leave it where the build did."""
        factory, *writes = self.history[_key(t)]
        if factory.rng is not None:
            torch.set_rng_state(factory.rng)
        base = factory.func(*factory.args, **{**factory.kwargs, "device": CPU})
        for op in writes:
            if op.rng is not None:
                torch.set_rng_state(op.rng)
            op.func(base.as_strided(*op.view), *op.args, **op.kwargs)
        return base.as_strided(t.shape, t.stride(), t.storage_offset())


def record_init(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, InitRecorder]:
    """`build()` on the meta device under an `InitRecorder`: (the meta model, its recorder)."""
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        model = build()
    recorder.end_rng = torch.get_rng_state()
    return model, recorder


@torch.no_grad()
def stream_seeded_weights(model: torch.nn.Module, recorder: InitRecorder | None, dtype: torch.dtype) -> Iterator:
    """Every rank: (name, tensor in `dtype`) for each parameter of the meta `model`, rank 0 replaying its seeded
    init (`recorder`, which only rank 0 has) and broadcasting it. Rank 0 first broadcasts whether every parameter
    replays (one line on every rank if not), last the generator's state after the build, which every rank takes."""
    import torch.distributed as dist

    from pipelines.train.sequence_parallel import collective_device

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    named = dict(model.named_parameters())
    message: list = [recorder.problem(named) if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(message[0])
    device = collective_device(dist.get_backend()) if distributed else CPU  # NCCL: CUDA tensors, gloo: CPU
    for name, meta in named.items():
        if rank == 0:
            value = recorder.materialize(meta).to(device=device, dtype=dtype)
        else:
            value = torch.empty(meta.shape, dtype=dtype, device=device)
        if distributed:
            dist.broadcast(value, src=0)
        yield name, value
    rng = [recorder.end_rng if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(rng, src=0)
    torch.set_rng_state(rng[0])
