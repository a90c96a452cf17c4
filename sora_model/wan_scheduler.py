"""A diffusers Wan folder's scheduler -> our sampling settings (`DiffusionConfig`), so a converted export samples as
`WanPipeline` does with that scheduler (`convert_wan.py` converts the rest of the folder).

FlowMatchEulerDiscreteScheduler becomes our Euler sampler on its grid; UniPCMultistepScheduler (the Hub folders'
default) and DPMSolverMultistepScheduler with flow sigmas become our `unipc` / `dpmpp` on their grids, with their
shift, order and variant (`diffusion.multistep`). All give the same latents (tests/unit/test_wan_samplers.py). A
setting we do not reproduce is a `WanFolderError` naming it.
"""

from __future__ import annotations

from .config import ConfigError, DiffusionConfig, MultistepConfig

WAN_STEPS, WAN_GUIDANCE = 50, 5.0
"""WanPipeline's default `num_inference_steps` and `guidance_scale`."""


class WanFolderError(ConfigError):
    """The folder is not a diffusers Wan pipeline we can convert; one line says why."""


def diffusion_config_from_scheduler(config: dict) -> DiffusionConfig:
    """Our sampling settings for the folder's scheduler, so the export samples as `WanPipeline` does with it.

    FlowMatchEulerDiscreteScheduler: our Euler sampler on its grid. UniPCMultistepScheduler (the Hub folders'
    default) and DPMSolverMultistepScheduler with flow sigmas: our `unipc` / `dpmpp` on their grids, with their
    shift, order and variant (`diffusion.multistep`). All give the same latents (tests/unit/test_wan_samplers.py).
    A setting we do not reproduce raises WanFolderError naming it.
    """
    name = config.get("_class_name")
    common = {
        "schedule": "rectified_flow",
        "prediction": "velocity",
        "num_sampling_steps": WAN_STEPS,
        "guidance_scale": WAN_GUIDANCE,
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
    }
    if name == "FlowMatchEulerDiscreteScheduler":
        if config.get("use_dynamic_shifting") or config.get("shift_terminal") or config.get("invert_sigmas"):
            raise WanFolderError("scheduler: dynamic shifting, shift_terminal and invert_sigmas are not supported")
        if any(
            config.get(k)
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
        ):
            raise WanFolderError("scheduler: karras/exponential/beta sigmas and stochastic sampling are not supported")
        return DiffusionConfig(
            **common, shift=float(config.get("shift", 1.0)), sampler="euler", time_grid="flow_match_euler"
        )
    if name in MULTISTEP_SCHEDULERS:
        return _multistep_diffusion_config(name, config, common)
    supported = ", ".join(["FlowMatchEulerDiscreteScheduler", *MULTISTEP_SCHEDULERS])
    raise WanFolderError(f"scheduler {name} is not supported (supported: {supported})")


MULTISTEP_SCHEDULERS = {
    "UniPCMultistepScheduler": ("unipc", "unipc"),
    "DPMSolverMultistepScheduler": ("dpmpp", "dpm_solver"),
}
"""diffusers scheduler class -> (our sampler, our time grid)."""
_MULTISTEP_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_dynamic_shifting",
    "thresholding",
    "shift_terminal",
    "solver_p",
    "rescale_betas_zero_snr",
)
# diffusers renames these solver types when it builds the scheduler (a saved config holds the renamed one).
_UNIPC_VARIANTS = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
_DPM_SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def _multistep_diffusion_config(name: str, config: dict, common: dict) -> DiffusionConfig:
    """`unipc` or `dpmpp` with the settings of a UniPCMultistepScheduler or DPMSolverMultistepScheduler config."""
    if config.get("prediction_type") != "flow_prediction":
        raise _refuse(name, config, "prediction_type", "Wan needs flow_prediction")
    if not config.get("use_flow_sigmas"):
        raise _refuse(name, config, "use_flow_sigmas", "Wan needs flow sigmas")
    for key in _MULTISTEP_UNSUPPORTED:
        if config.get(key):
            raise _refuse(name, config, key, "only plain flow sigmas with a fixed flow_shift are")
    order, final = config.get("solver_order", 2), config.get("final_sigmas_type", "zero")
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise _refuse(name, config, "solver_order", "1, 2 or 3")
    if final not in ("zero", "sigma_min"):
        raise _refuse(name, config, "final_sigmas_type", "zero or sigma_min")
    lower_order_final = bool(config.get("lower_order_final", True))
    sampler, grid = MULTISTEP_SCHEDULERS[name]
    if sampler == "unipc":
        multistep, betas = _unipc_multistep(name, config, order, final, lower_order_final), {}
    else:
        multistep, betas = _dpm_solver_multistep(name, config, order, final, lower_order_final)
    return DiffusionConfig(
        **common,
        **betas,
        shift=float(config.get("flow_shift", 1.0)),
        sampler=sampler,
        time_grid=grid,
        multistep=multistep,
    )


def _refuse(name: str, config: dict, key: str, why: str) -> WanFolderError:
    """The one-line error for a scheduler setting we do not reproduce."""
    return WanFolderError(f"scheduler {name}: {key} {config.get(key)!r} is not supported ({why})")


def _unipc_multistep(name: str, config: dict, order: int, final: str, lower_order_final: bool) -> MultistepConfig:
    """`unipc`'s settings from a UniPCMultistepScheduler config (its variant and skipped corrector steps)."""
    variant = _UNIPC_VARIANTS.get(config.get("solver_type", "bh2"))
    if variant is None:
        raise _refuse(name, config, "solver_type", "bh1 or bh2")
    if not config.get("predict_x0", True):
        raise _refuse(name, config, "predict_x0", "flow prediction needs the data-prediction form")
    if not lower_order_final and order > 1 and final == "zero":
        raise _refuse(
            name, config, "lower_order_final", "false with final_sigmas_type zero makes diffusers' last step non-finite"
        )
    corrector = config.get("disable_corrector") or []
    if not isinstance(corrector, list) or not all(isinstance(i, int) and i >= 0 for i in corrector):
        raise _refuse(name, config, "disable_corrector", "a list of step indices")
    return MultistepConfig(
        order=order,
        lower_order_final=lower_order_final,
        final_sigma=final,
        unipc_variant=variant,
        disable_corrector=tuple(corrector),
    )


def _dpm_solver_multistep(
    name: str, config: dict, order: int, final: str, lower_order_final: bool
) -> tuple[MultistepConfig, dict]:
    """`dpmpp`'s settings from a DPMSolverMultistepScheduler config, and the beta chain its `sigma_min` end needs
    (DiffusionConfig's beta_start/beta_end; empty for a `zero` end)."""
    if config.get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "deis"):  # diffusers turns deis into ++
        raise _refuse(
            name,
            config,
            "algorithm_type",
            "dpmsolver++ only: the sde variants draw noise, dpmsolver has no flow prediction",
        )
    solver_type = _DPM_SOLVER_TYPES.get(config.get("solver_type", "midpoint"))
    if solver_type is None:
        raise _refuse(name, config, "solver_type", "midpoint or heun")
    betas = {}
    if final == "sigma_min":  # diffusers ends at the beta chain's first level then
        if config.get("beta_schedule", "linear") != "linear" or config.get("trained_betas") is not None:
            raise _refuse(name, config, "beta_schedule", "final_sigmas_type sigma_min needs linear betas")
        betas = {"beta_start": float(config.get("beta_start", 1e-4)), "beta_end": float(config.get("beta_end", 0.02))}
    multistep = MultistepConfig(
        order=order,
        lower_order_final=lower_order_final,
        final_sigma=final,
        dpm_solver_type=solver_type,
        euler_at_final=bool(config.get("euler_at_final", False)),
    )
    return multistep, betas
