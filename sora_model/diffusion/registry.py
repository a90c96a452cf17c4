"""Every sampler by name, in one table: which schedules it serves, whether it draws noise, and how it is run.

The config's validation (`DiffusionConfig.sampler`), the `--sampler` help of the CLI, the HTTP schema (through
`SAMPLER_NAMES`), the pipeline's batching of stochastic samplers (`STOCHASTIC_SAMPLERS`) and the schedules'
dispatch all read this table, so a new sampler is one row here plus its integrator.

Pure Python (no torch): `sora_model.config` imports it to build the `SamplerName` type.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["gaussian", "flow"]
Kind = Literal["chain", "ode", "multistep"]

FAMILY_OF_SCHEDULE: dict[str, Family] = {"ddpm_linear": "gaussian", "adaptive": "gaussian", "rectified_flow": "flow"}
"""Which sampler family each `DiffusionConfig.schedule` takes: DDPM-style Gaussian chains or rectified flow."""
FAMILY_LABELS: dict[Family, str] = {"flow": "flow", "gaussian": "DDPM schedules"}


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its name, the schedules it serves, and how the schedule calls it."""

    name: str
    family: Family
    kind: Kind
    """How it is run. `chain`: over a denoiser and a strided subset of the training chain (schedules.GaussianDiffusion);
    `ode`: over a velocity field and a flow time grid 1 -> 0; `multistep`: over a velocity field, the grid's sigmas,
    the timesteps the network sees and the `diffusion.multistep` solver settings."""
    integrator: str
    """`module:function` under sora_model.diffusion, resolved on first use."""
    summary: str
    stochastic: bool = False
    """Draws fresh noise every step, so requests batched together must each get their own noise stream (DDIM too
    when diffusion.ddim_eta > 0; see `is_stochastic`)."""
    calls_per_step: int = 1
    """Network calls per step; a two-call sampler skips its second call on the last step (Heun's final Euler step)."""

    def nfe(self, steps: int) -> int:
        """Network function evaluations for `steps` steps, before classifier-free guidance doubles them."""
        return steps if self.calls_per_step == 1 else self.calls_per_step * steps - 1

    def resolve(self) -> Callable[..., Any]:
        """The integrator function."""
        module, _, function = self.integrator.partition(":")
        return getattr(importlib.import_module(f"sora_model.diffusion.{module}"), function)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", "gaussian", "chain", "samplers:ddpm_sample", "ancestral DDPM", stochastic=True),
        SamplerSpec("ddim", "gaussian", "chain", "samplers:ddim_sample", "DDIM (deterministic at ddim_eta 0)"),
        SamplerSpec("euler", "flow", "ode", "samplers:euler_sample", "Euler"),
        SamplerSpec(
            "heun", "flow", "ode", "samplers:heun_sample", "Heun (2nd order, 2 calls per step)", calls_per_step=2
        ),
        SamplerSpec("ab2", "flow", "ode", "samplers:ab2_sample", "Adams-Bashforth 2 (2nd order multistep)"),
        SamplerSpec(
            "unipc",
            "flow",
            "multistep",
            "multistep:unipc_sample",
            "UniPC multistep (diffusers' UniPCMultistepScheduler)",
        ),
        SamplerSpec(
            "dpmpp",
            "flow",
            "multistep",
            "multistep:dpmpp_sample",
            "DPM-Solver++ multistep (diffusers' DPMSolverMultistepScheduler)",
        ),
    )
}
"""All samplers by name; the order is the order the CLI and error messages list them in."""

ALL_SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SAMPLER_NAMES: dict[str, tuple[str, ...]] = {
    family: tuple(name for name, spec in SAMPLERS.items() if spec.family == family) for family in ("gaussian", "flow")
}
"""Samplers valid for each family of schedules (DDPM-style Gaussian chains, rectified flow)."""
STOCHASTIC_SAMPLERS: tuple[str, ...] = tuple(name for name, spec in SAMPLERS.items() if spec.stochastic)
"""Samplers that always draw fresh noise every step."""


def family_of(schedule: str) -> Family:
    """The sampler family of a `DiffusionConfig.schedule`."""
    return FAMILY_OF_SCHEDULE[schedule]


def sampler_problem(name: str, schedule: str) -> str | None:
    """Why `name` cannot sample `schedule` (one line naming the valid choices), or None when it can."""
    family = FAMILY_OF_SCHEDULE.get(schedule)
    if family is None:
        return f"unknown diffusion.schedule '{schedule}'; choose one of: {', '.join(FAMILY_OF_SCHEDULE)}"
    if name in SAMPLER_NAMES[family]:
        return None
    known = "" if name in SAMPLERS else "unknown "
    choices = ", ".join(SAMPLER_NAMES[family])
    return f"{known}sampler '{name}' is not available for schedule '{schedule}'; choose one of: {choices}"


def is_stochastic(name: str, ddim_eta: float = 0.0) -> bool:
    """Whether `name` draws noise while sampling: the stochastic samplers, and DDIM with eta > 0."""
    return SAMPLERS[name].stochastic or (name == "ddim" and ddim_eta > 0)


def sampler_help() -> str:
    """The samplers for a `--sampler` help line: `euler|heun|... (flow) or ddpm|ddim (DDPM schedules)`."""
    return " or ".join(f"{'|'.join(SAMPLER_NAMES[f])} ({FAMILY_LABELS[f]})" for f in ("flow", "gaussian"))
