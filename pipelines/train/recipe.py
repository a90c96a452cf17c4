"""Training recipes: YAML curricula loaded into typed dataclasses (unknown keys and wrong types are errors).

    recipe = load_recipe("cluster/recipes/smoke-cpu.yaml")
    # stage_data.py: stage name -> prepared folders
    buckets = resolve_stage_data(recipe, ["data/images", "data/clips"])

A recipe is one model trained through a list of stages (the article's curriculum, 4.1): each stage
names a prepared bucket (`FRAMESxHEIGHTxWIDTH`, as `sora data prepare` writes it), its batch, steps,
learning rate and loss weights, and starts from the weights the previous stage ended with. Every error
is one line naming the key, e.g. `stages[1].lr must be a number, got 'fast'`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.train.model_spec import ModelSpec, init_image_encoder, resolve_init
from sora_model.config import (
    AutoencoderConfig,
    ConfigError,
    DiffusionConfig,
    DiTConfig,
    ImageEncoderConfig,
    LossConfig,
    PipelineConfig,
    SampleConfig,
    TextEncoderConfig,
    from_dict,
    to_dict,
)
from sora_model.lora import LORA_TARGET_MODULES


@dataclass
class DeepSpeedSpec:
    """DeepSpeed engine settings shared by every stage (mapped one to one by `engine.ds_config`)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    """ZeRO-3 partitions parameters, gradients and optimizer state: per-rank memory falls as 1/world size.
    1 partitions optimizer state only, 2 also gradients; 0 is plain data parallelism."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory and step it there (DeepSpeed's CPU Adam, on the worker's
    `cpus_per_worker` threads: give GPU workers 8 or more CPUs when this is on)."""
    offload_params: bool = False
    """Keep ZeRO-3 parameter partitions in CPU memory between uses (stage 3 only)."""
    bf16: bool | Literal["auto"] = "auto"
    """`auto`: bf16 on cuda, fp32 on cpu (CPU bf16 matmuls are slow and gloo reduces fp32 anyway)."""
    fp32_reduce: bool = True
    """Under bf16, reduce gradients across ranks and accumulate micro-batches in fp32: bf16's 8-bit
    mantissa loses small gradients when many ranks or micro-batches are summed."""
    hpz_partition_size: int = 1
    """ZeRO++ hierarchical partitioning: a secondary copy of the weights sharded within groups of this
    many ranks (the GPUs of one node, e.g. 8), so forward all-gathers stay on NVLink. 1 = off."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduce-scatter bucket: larger buckets mean fewer, faster collectives, more memory."""
    prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: elements of upcoming layers' parameters gathered ahead of use (overlaps communication)."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters this small stay whole on every rank (gathering them costs more than they weigh). After
    every optimizer step DeepSpeed all-gathers each such parameter on its own: for a small model on CPU (gloo)
    that costs more than gathering everything per block, and 0 (every tensor partitioned) is faster there."""
    gather_per_block: bool = False
    """ZeRO-3: each DiT block's parameters are gathered in one collective when the block starts and released when
    it ends (DeepSpeed's leaf modules; FSDP's per-block wrapping), instead of one gather and hook per submodule:
    fewer, larger all-gathers and far fewer hooks."""
    max_live_parameters: int = 1_000_000_000
    """ZeRO-3: gathered parameter elements allowed at once before released ones must be freed."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (costs bucket-sized buffers)."""
    gradient_clipping: float = 1.0
    """Global-norm clip; DiT-style training diverges without it at large learning rates."""
    weight_decay: float = 0.0
    """AdamW decay; 0 as in DiT (diffusion models gain little from it)."""
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage 3")
        if self.gradient_clipping < 0:
            raise ConfigError(f"deepspeed.gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.hpz_partition_size < 1:
            raise ConfigError(f"deepspeed.hpz_partition_size must be >= 1, got {self.hpz_partition_size}")
        if self.hpz_partition_size > 1 and self.zero_stage != 3:
            raise ConfigError("deepspeed.hpz_partition_size > 1 needs deepspeed.zero_stage 3")
        for key in ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"deepspeed.{key} must be >= 1, got {getattr(self, key)}")
        if self.gather_per_block and self.zero_stage != 3:
            raise ConfigError("deepspeed.gather_per_block needs deepspeed.zero_stage 3")
        if self.param_persistence_threshold < 0:
            raise ConfigError(
                f"deepspeed.param_persistence_threshold must be >= 0, got {self.param_persistence_threshold}"
            )


@dataclass
class EMASpec:
    """Exponential moving average of the weights (kept per ZeRO-3 partition, gathered at export)."""

    enabled: bool = False
    decay: float = 0.999
    """Averaging horizon ~ 1 / (1 - decay) steps; 0.9999 for long GPU runs, lower for short CPU runs."""
    warmup: bool = False
    """Decay warm-up: step n (counted from the run's first step) uses min(decay, (1 + n) / (10 + n)), so the
    average forgets the random initial weights within tens of steps instead of ~1 / (1 - decay) (timm's and
    diffusers' `use_ema_warmup`). Off by default: the long-horizon recipes start from a good model anyway."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class SampleSpec:
    """Stage-end sample grids and the generation defaults written into the export."""

    steps: int | None = None
    """Sampling steps for the stage-end grids; None uses diffusion.num_sampling_steps. Keep small on CPU."""
    seed: int = 0
    fps: int = 8
    """Frame rate of the sample GIFs and of the export's generation default."""
    num_cpus: float | None = None
    """CPUs reserved for the actor that renders stage-end grids from each stage's export beside training (no
    rank waits for it). None: 1 on cuda; 0 on cpu, where it briefly shares the workers' cores at stage ends."""
    num_gpus: float = 0.0
    """GPUs (or a fraction) for that actor; 0 samples on CPU."""
    timeout_s: float = 1800.0
    """How long the driver waits at the end of the run for outstanding sample grids before giving up on them."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"sample.steps must be >= 1, got {self.steps}")
        if (self.num_cpus or 0) < 0 or self.num_gpus < 0:
            raise ConfigError(f"sample.num_cpus and sample.num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.timeout_s <= 0:
            raise ConfigError(f"sample.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class DataSpec:
    """How each rank reads its clips (Ray Data -> the training device)."""

    shuffle: Literal["global", "local"] = "global"
    """`global`: every epoch reads the shard files in a new seeded order and each file's rows in a seeded
    permutation (data.StagePlan: a function of seed, stage, epoch and file, so a resume reads what the
    uninterrupted run would have); `local`: files and rows in order."""
    shuffle_buffer: int = 64
    """Accepted for older recipes and unused: rows are mixed by the per-file permutation above, since a per-rank
    buffer's contents are lost at a restart (a resumed run would then draw other batches)."""
    prefetch_batches: int = 2
    """Micro-batches prepared ahead of the step (decoded, collated and, on cuda, copied to the device)."""
    pin_memory: bool = True
    """On cuda, stage batches in page-locked host memory so the copy to the GPU overlaps compute."""

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.prefetch_batches < 0:
            raise ConfigError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the model's attention and MLP projections; the base weights stay frozen.

    Only the adapters train, are averaged by the EMA, checkpointed and exported: `RUN/export/` is then a peft
    adapter folder (what `--lora` takes, with `init_from` as its base), `RUN/export/merged/` a whole export too
    when `merge_export` is on (or later: `sora export --checkpoint CKPT --out DIR --merge-lora`)."""

    rank: int = 16
    """Adapter rank r: parameters per adapted Linear are r * (in + out). 16-64 is what Wan LoRA recipes use."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / rank) * B @ A. None takes alpha = rank (scale 1), so changing the
    rank does not change the effective learning rate of a fresh adapter."""
    targets: str | list[str] = LORA_TARGET_MODULES
    """peft `target_modules`: a regex on module names, or a list of name suffixes. The default: every block's
    self-attention qkv/proj, cross-attention q/kv/proj and MLP projections (what diffusers' and DiffSynth's Wan
    LoRA recipes adapt)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft `lora_dropout`); 0 as in most video LoRA recipes."""
    merge_export: bool = False
    """Also write `RUN/export/merged/` (and each stage export's): the base with the adapters merged in, an export
    `--model` loads without `--lora` (as fast to sample as the base)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets must name at least one module (a regex or a list of names)")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclass
class StageSpec:
    """One curriculum stage; starts from the weights the previous stage ended with."""

    name: str
    frames: int
    """Frames per clip; must equal the bucket's frames (1 for image stages; 1 + 4k for Wan's VAE)."""
    steps: int
    """Optimizer steps in this stage."""
    lr: float
    resolution: int = 0
    """Square clip size in pixels; must equal the bucket's height and width (a mixed stage: one bucket's, the shape it
    samples at)."""
    height: int = 0
    width: int = 0
    """A non-square clip size in pixels (e.g. Wan's 480x832), given instead of `resolution`; 0 takes `resolution`."""
    dataset: str = ""
    """Bucket `FRAMESxHEIGHTxWIDTH` inside one of the `--data` folders (or a folder path holding one bucket)."""
    datasets: list[str] = field(default_factory=list)
    """A mixed stage (Open-Sora's mixed buckets): several buckets drawn as one stream, each micro-batch a packed
    batch of clips of any of them (NaViT: tokens concatenated, each clip attends to itself; no padding) holding up
    to `tokens_per_batch` tokens. Give `dataset` or `datasets`, not both."""
    tokens_per_batch: int = 0
    """A mixed stage's token budget per rank and micro-batch (clips are added while they fit; at least one)."""
    micro_batch: int = 1
    """Clips per rank per forward pass (a mixed stage: the fewest clips its token budget holds, for the clip count
    check)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step: global batch = micro_batch * grad_accum * workers."""
    warmup_steps: int = 0
    """Linear warm-up from 0 at the start of the stage (a new resolution or length shocks the model)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: constant, or cosine decay to `min_lr_ratio * lr` by the stage's end."""
    min_lr_ratio: float = 0.1
    loss: LossConfig = field(default_factory=LossConfig)
    cond_dropout: float | None = None
    """Caption dropout for classifier-free guidance; None uses diffusion.cond_dropout."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (and always at the stage end); 0 only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts sampled into RUN/samples/<stage>.gif at the stage end; empty skips sampling."""

    def __post_init__(self) -> None:
        if not self.resolution and not (self.height and self.width):
            raise ConfigError("give resolution (square clips) or height and width")
        self.height, self.width = self.height or self.resolution, self.width or self.resolution
        for key in ("height", "width", "frames", "steps", "micro_batch", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.cond_dropout is not None and not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if bool(self.dataset) == bool(self.datasets):
            raise ConfigError(
                "give dataset (one bucket) or datasets (a mixed stage's buckets), not both and not neither"
            )
        if self.datasets and len(set(self.datasets)) != len(self.datasets):
            raise ConfigError(f"datasets lists a bucket twice: {self.datasets}")
        if self.datasets and self.tokens_per_batch < 1:
            raise ConfigError(
                "tokens_per_batch must be >= 1 for a mixed stage (datasets: [...]): the packed micro-batch's token "
                "budget"
            )
        if self.tokens_per_batch and not self.datasets:
            raise ConfigError(
                "tokens_per_batch applies to a mixed stage only (datasets: [...]); a one-bucket stage uses micro_batch"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the stage's clips in pixels."""
        return self.frames, self.height, self.width

    @property
    def size_text(self) -> str:
        return f"{self.frames} frames at {self.height}x{self.width}"

    @property
    def mixed(self) -> bool:
        """Whether micro-batches are packed from several buckets."""
        return bool(self.datasets)

    @property
    def buckets(self) -> list[str]:
        return list(self.datasets) if self.datasets else [self.dataset]


@dataclass
class Recipe:
    """A model, its noise process and conditioning, the engine settings, and the curriculum."""

    name: str
    """Run name: the Ray Train run is `RUN/ray_results/<name>`, which `--resume` finds again."""
    stages: list[StageSpec]
    init_from: str | None = None
    """An export folder to start from (`sora convert --from-diffusers` or a training run's): its config.json gives
    the model (a recipe `model:` must then be omitted or agree, but for runtime options) and, where the recipe
    leaves them out, the text encoder, autoencoder and diffusion settings; its model.safetensors the start
    weights. A local path every node can read (shared storage); rank 0 reads it and the others receive it."""
    lora: LoraSpec | None = None
    """Train LoRA adapters instead of all weights (needs `init_from`, the base they adapt); None: a full fine-tune."""
    model: ModelSpec = field(default_factory=ModelSpec)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """Image-to-video models' (`model.image_dim`) CLIP image encoder, written into the exports so they sample from
    images; with `init_from` the export's (absolute paths) when left out. Training itself reads the features
    `sora data prepare --image-conditioning` stored, never the encoder."""
    sample: SampleSpec = field(default_factory=SampleSpec)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    ema: EMASpec = field(default_factory=EMASpec)
    data: DataSpec = field(default_factory=DataSpec)
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the workers train, declared, never guessed from what the cluster holds at submit time:
    `cuda` workers always ask Ray for a GPU each (so an autoscaler adds GPU nodes); `--device` overrides."""
    workers: int = 2
    """Ray Train workers (one DeepSpeed rank each); `--workers` overrides."""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves per worker (its loader threads and OMP threads). None: 8 on cuda (one CPU starves
    a GPU's loader); on cpu 1, or an equal share of a machine with fewer CPUs than workers (a laptop)."""
    process_group_timeout_s: int = 1800
    """Seconds a collective may wait for the slowest rank before the process group fails the run."""
    max_failures: int = 2
    """Worker/node losses survived by restarting from the last checkpoint (Ray Train FailureConfig)."""
    max_nonfinite_steps: int = 5
    """Consecutive micro-batches with a non-finite loss before the run stops (each one is skipped and counted)."""
    seed: int = 0
    """Seeds initial weights and every step's timesteps, noise and caption dropout."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the Ray run folder (oldest deleted first)."""
    sequence_parallel_size: int = 1
    """Ranks that share one clip's tokens (DeepSpeed-Ulysses: all-to-all around attention), for clips too long
    for one device's activations; 1 = off. Must divide the workers, model.num_heads and every stage's tokens
    per clip. Composes with ZeRO-3: the data-parallel degree is workers / sequence_parallel_size."""
    compile: bool = False
    """`torch.compile` the model in the trainer (DeepSpeed `engine.compile`, Inductor, one graph per bucket).
    Off by default: on CPU a compiled DiT-demo step is ~1.14x faster but each bucket's compile takes minutes,
    which a 15-minute demo never earns back (benchmarks/RESULTS.md, compile_train_step_ratio); on for long runs.
    Needs deepspeed.zero_stage <= 2: ZeRO-3's per-module parameter hooks made Dynamo recompile on every module
    (its limit of 64 graphs was hit within the first step, measured on CPU)."""
    checkpoint_fraction: float = 0.0
    """Selective activation checkpointing: this fraction of the DiT blocks recompute their activations in the
    backward (spread evenly over depth, applied from outside the model, as torchtitan's selective per-layer AC).
    0 keeps every activation; 1 checkpoints every block (model.gradient_checkpointing does the same); between
    them memory and recompute trade block by block (0.5: every other block)."""
    peak_tflops: float | None = None
    """The device's dense peak (TFLOP/s per worker, at the training precision) that MFU in metrics.csv divides
    by. None: looked up from the GPU's name (metrics.PEAK_TFLOPS: A100, H100, H200, L40S, ...) or, on cpu, a
    nominal CPU figure; set it for devices the table does not know."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages must list at least one stage")
        names = [s.name for s in self.stages]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ConfigError(f"stages[{i}].name '{n}' is used twice; stage names must be unique")
            if not n or "/" in n or n.startswith("."):
                raise ConfigError(f"stages[{i}].name must be a plain name (it names files), got {n!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.process_group_timeout_s < 1:
            raise ConfigError(f"process_group_timeout_s must be >= 1, got {self.process_group_timeout_s}")
        if self.compile and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "compile: true needs deepspeed.zero_stage <= 2 (ZeRO-3's parameter hooks recompile the graph per "
                "module)"
            )
        if not 0.0 <= self.checkpoint_fraction <= 1.0:
            raise ConfigError(f"checkpoint_fraction must be in [0, 1], got {self.checkpoint_fraction}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"peak_tflops must be > 0, got {self.peak_tflops}")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}")
        if self.lora is not None and not self.init_from:
            raise ConfigError("lora needs init_from: the export whose weights the adapters adapt")

    @property
    def bf16(self) -> bool:
        """Whether the engine trains in bf16 (`deepspeed.bf16: auto` means on cuda)."""
        return self.deepspeed.bf16 is True or (self.deepspeed.bf16 == "auto" and self.device == "cuda")

    # -- derived --------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def model_config(self) -> DiTConfig:
        return self.model.build()

    def pipeline_config(self) -> PipelineConfig:
        """The export's config.json: generation defaults are the last stage's clip size and the recipe's sampler."""
        last = self.stages[-1]
        return PipelineConfig(
            model=self.model_config(),
            diffusion=self.diffusion,
            text_encoder=self.text_encoder,
            autoencoder=self.autoencoder,
            image_encoder=self.image_encoder,
            sample=SampleConfig(num_frames=last.frames, height=last.height, width=last.width, fps=self.sample.fps),
            preset=self.model.preset if self.model.base is None else None,
        )


def _check_stage_shapes(recipe: Recipe, model: DiTConfig) -> None:
    sp = recipe.sequence_parallel_size
    if model.num_heads % sp:
        raise ConfigError(f"sequence_parallel_size {sp} must divide model.num_heads ({model.num_heads})")
    for i, stage in enumerate(recipe.stages):
        if stage.mixed and sp > 1:
            raise ConfigError(
                f"stages[{i}]: a mixed stage (datasets) packs clips of several shapes, which sequence_parallel_size "
                f"{sp} cannot shard; use 1"
            )
        if stage.mixed and recipe.compile:
            raise ConfigError(
                f"stages[{i}]: a mixed stage's packed batches change shape every step (a graph each); set compile: "
                "false"
            )
        pt, ph, pw = model.patch_size
        if stage.frames % pt or stage.height % ph or stage.width % pw:
            raise ConfigError(
                f"stages[{i}]: {stage.frames} frames at {stage.height}x{stage.width}px do not divide by "
                f"model.patch_size {list(model.patch_size)}"
            )
        tokens = (stage.frames // pt) * (stage.height // ph) * (stage.width // pw)
        if tokens % sp:
            raise ConfigError(f"stages[{i}]: {tokens} tokens per clip do not divide by sequence_parallel_size {sp}")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A Recipe from a parsed YAML mapping; ConfigError (one line, naming the key) when it is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if data.get("init_from") is not None:
        data = resolve_init(data)
        if data.get("image_encoder") is None:
            data = init_image_encoder(data)
    # Stage errors name the stage by index: `stages[1].lr ...`. from_dict does that for list items,
    # but the stage-level __post_init__ checks raise without the prefix, so add it here.
    stages = data.get("stages")
    if isinstance(stages, list):
        parsed = []
        for i, s in enumerate(stages):
            try:
                parsed.append(from_dict(StageSpec, s, f"stages[{i}]"))
            except ConfigError as err:
                msg = str(err)
                parsed_msg = msg if msg.startswith(("stages[", "unknown key")) else f"stages[{i}].{msg}"
                raise ConfigError(parsed_msg) from None
        data["stages"] = parsed
    recipe = from_dict(Recipe, data)
    model = recipe.model_config()
    _check_stage_shapes(recipe, model)
    if recipe.text_encoder.max_length < 1:
        raise ConfigError(f"text_encoder.max_length must be >= 1, got {recipe.text_encoder.max_length}")
    if recipe.deepspeed.offload_params and recipe.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage 3")
    return recipe


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe YAML file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{path} is not valid YAML: {first}") from None
    return parse_recipe(data, path)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """JSON-ready form (what the workers receive and `parse_recipe` reads back)."""
    return to_dict(recipe)
