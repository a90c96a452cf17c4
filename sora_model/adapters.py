"""LoRA adapters applied per call, unmerged: several resident on one model, loaded on demand, bounded by bytes.

    adapters = AdapterCache(pipe.model, {"style": "loras/style.safetensors"}, max_bytes=1 << 30)
    with adapters.applied("style"):       # this call's Linears compute base(x) + B (A x)
        latents = pipe.sample_latents(prompts, ...)

The base weights are never touched: `applied` puts a forward hook on each Linear the adapter targets (from outside,
the model unchanged) and takes them off again, so a
request without an adapter runs the base model at the base model's cost, and switching adapters costs nothing
but the hooks. Each hook adds B @ (A @ x) with the scale folded into B (`lora.LoraUpdate`): two thin matmuls
per Linear, rank R wide, next to the Linear's (out x in) one (a fused q/k/v projection's parts each over their own
rows, so no work goes into zero blocks).

One adapter per call: a batch is grouped by adapter before it gets here (the server's batching key holds the
adapter), rather than each row picking its own (S-LoRA/Punica's gathered per-row matmuls). Under classifier-free
guidance and CPU chunking the rows of a call are reshuffled, and every row of a group would pay a gather; grouping
keeps the apply two dense matmuls, and same-adapter requests still share a forward pass.

Resident adapters live in an LRU bounded by bytes (what their bound A and B hold, in the model's dtype); loading
one that does not fit evicts the least recently used. An adapter larger than the whole budget is refused.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoraFile, LoraUpdate


@dataclass
class BoundAdapter:
    """An adapter ready to apply: {our Linear: LoraUpdate} on the model's device and dtype."""

    name: str
    updates: dict[str, LoraUpdate]

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.updates.values())


def _lora_hook(update: LoraUpdate):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return update.add_to(args[0], out)  # (..., out): base(x) + B (A x)

    return hook


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """What bound adapters are kept in: the dtype of the blocks' weights (bf16 under bf16 inference), else fp32."""
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


class AdapterCache:
    """Named LoRA adapters for one model: checked up front (headers only), loaded when first used, kept in an LRU
    bounded by `max_bytes`, applied one at a time with `applied(name)`."""

    def __init__(self, model: nn.Module, paths: dict[str, str], max_bytes: int) -> None:
        self.model = model
        self.paths = dict(paths)
        self.max_bytes = int(max_bytes)
        self.dtype = adapter_dtype(model)
        self._resident: OrderedDict[str, BoundAdapter] = OrderedDict()
        self._lock = threading.RLock()  # one call applies hooks at a time (the generator samples one group at a time)
        self.hits = self.misses = self.evictions = 0
        self.load_s = 0.0

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values())

    @property
    def resident(self) -> list[str]:
        """Names held, least recently used first."""
        return list(self._resident)

    def _file(self, name: str) -> LoraFile:
        if name not in self.paths:
            raise ValueError(f"unknown LoRA '{name}'; configured: {', '.join(sorted(self.paths)) or 'none'}")
        return LoraFile(self.paths[name])

    def check(self, name: str) -> int:
        """Check an adapter against the model from its header (no tensors read); its bound size in bytes.
        ValueError (one line) for a bad file, a key this DiT lacks, a shape mismatch, or a size over the budget."""
        size = self._file(name).bound_bytes(self.model, self.dtype)
        if size > self.max_bytes:
            raise ValueError(
                f"LoRA '{name}' needs {size} bytes resident, over the adapter budget of {self.max_bytes} bytes"
            )
        return size

    def check_all(self) -> dict[str, str]:
        """{name: one-line problem} for every configured adapter that cannot be used (empty when all can)."""
        problems = {}
        for name in self.paths:
            try:
                self.check(name)
            except ValueError as err:
                problems[name] = str(err)
        return problems

    def get(self, name: str) -> BoundAdapter:
        """The bound adapter, loaded (and the least recently used evicted until it fits) on a miss."""
        with self._lock:
            if name in self._resident:
                self.hits += 1
                self._resident.move_to_end(name)
                return self._resident[name]
            self.misses += 1
            started = time.perf_counter()
            bound = BoundAdapter(name, self._file(name).bind(self.model, self.dtype))
            if bound.nbytes > self.max_bytes:
                raise ValueError(
                    f"LoRA '{name}' needs {bound.nbytes} bytes resident, over the adapter budget "
                    f"of {self.max_bytes} bytes"
                )
            while self._resident and self.bytes + bound.nbytes > self.max_bytes:
                self._resident.popitem(last=False)
                self.evictions += 1
            self._resident[name] = bound
            self.load_s += time.perf_counter() - started
            return bound

    @contextmanager
    def applied(self, name: str | None) -> Iterator[BoundAdapter | None]:
        """While inside, the model computes with adapter `name` (None: the base model, nothing applied)."""
        if name is None:
            yield None
            return
        with self._lock:
            bound = self.get(name)
            modules = dict(self.model.named_modules())
            handles = [
                modules[target].register_forward_hook(_lora_hook(update)) for target, update in bound.updates.items()
            ]
            try:
                yield bound
            finally:
                for h in handles:
                    h.remove()

    def stats(self) -> dict[str, int | float | list[str]]:
        return {
            "resident": self.resident,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "load_s": round(self.load_s, 4),
        }
