"""How one request is split over devices: `ParallelConfig`, checked against the model before any process starts.

Pure Python and `sora_model.config` only, so the CLI and the Serve config can validate it without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sora_model.config import ConfigError, DiTConfig

MAX_SEQUENCE_PARALLEL = 64
"""A bound that catches typos (a world of 800 local processes); far above any one node's devices."""
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)
"""How long a rank waits for the others at a collective: a 14B load takes minutes; a dead rank then fails the run."""


@dataclass(frozen=True)
class ParallelConfig:
    sequence: int = 1
    """Ulysses sequence-parallel ranks per branch: each holds 1/sequence of the clip's tokens and all-to-alls
    around self-attention. 1 = off. Must divide the model's attention heads (each rank attends with H/sequence)."""
    cfg: bool = False
    """Classifier-free guidance's conditional and unconditional branches on two groups of `sequence` ranks, which
    exchange their predictions once per step: twice the ranks, half the time per step when guidance is on."""

    @property
    def world_size(self) -> int:
        """Processes (devices) one request uses."""
        return self.sequence * (2 if self.cfg else 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def check(self, model: DiTConfig | None = None, field: str = "parallel.sequence") -> ParallelConfig:
        """A `ConfigError` naming the field and its limit when the split cannot work; returns self."""
        if not 1 <= self.sequence <= MAX_SEQUENCE_PARALLEL:
            raise ConfigError(f"{field} must be between 1 and {MAX_SEQUENCE_PARALLEL}, got {self.sequence}")
        if model is not None and model.num_heads % self.sequence:
            raise ConfigError(
                f"{field} {self.sequence} must divide the model's {model.num_heads} attention heads "
                f"(Ulysses gives each rank num_heads/sequence heads); use a divisor of {model.num_heads}"
            )
        return self
