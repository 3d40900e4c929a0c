"""Typed configuration: one dataclass per section, each field with its allowed values.

Every component receives only its own section (``parallelize(model, parallel=cfg.parallel, ...)``).
OmegaConf merges YAML and ``key=value`` overrides onto these dataclasses (see ``load.py``), which
rejects unknown keys and wrong types. A field's allowed values sit on the field itself, as
``dataclasses.field`` metadata made by the helpers below (``choice``, ``bounded``, ``positive``,
``non_negative``, ``checked``); ``validate.validate_config`` walks the tree, checks that metadata
and names the full dotted key, then runs the few checks that span several fields.

This module imports nothing from the rest of ``speed``: the diffusion code imports it, not the
other way round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and how to fix it."""


# ----------------------------------------------------------------------------- field helpers
#
# Metadata keys the validator understands (a field may combine them):
#   choices        tuple: the allowed values
#   min, max       numeric bounds, inclusive unless min_exclusive / max_exclusive is True;
#                  with choices as well, a value passes if it is one of the choices OR a number
#                  within the bounds (e.g. "auto" or a number > 0)
#   hint           text appended to the error message in parentheses
#   check          callable(key, value) that raises ConfigError (for rules no bound expresses)
# None passes every check: it is the "unset" of an Optional field (OmegaConf refuses None elsewhere).

_FIRST = object()


def choice(*values: Any, default: Any = _FIRST, hint: Optional[str] = None) -> Any:
    """A field that must be one of ``values``; the default is the first value unless given."""
    return field(default=values[0] if default is _FIRST else default, metadata=_meta(choices=values, hint=hint))


def bounded(
    default: Any,
    min: Optional[float] = None,
    max: Optional[float] = None,
    *,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    also: Tuple[Any, ...] = (),
    hint: Optional[str] = None,
) -> Any:
    """A number within [min, max] (either end optional or exclusive), or one of ``also``."""
    return field(
        default=default,
        metadata=_meta(
            min=min, max=max, min_exclusive=min_exclusive, max_exclusive=max_exclusive, choices=also or None, hint=hint
        ),
    )


def positive(default: Any, *, also: Tuple[Any, ...] = (), hint: Optional[str] = None) -> Any:
    """A number > 0 (or one of ``also``)."""
    return bounded(default, min=0, min_exclusive=True, also=also, hint=hint)


def non_negative(default: Any, *, also: Tuple[Any, ...] = (), hint: Optional[str] = None) -> Any:
    """A number >= 0 (or one of ``also``)."""
    return bounded(default, min=0, also=also, hint=hint)


def checked(default: Any, check: Callable[[str, Any], None]) -> Any:
    """A field checked by ``check(dotted_key, value)``, which raises ConfigError."""
    return field(default=default, metadata={"check": check})


def _meta(**items: Any) -> Dict[str, Any]:
    return {k: v for k, v in items.items() if v is not None and v is not False}


# ----------------------------------------------------------------------------- custom field checks

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_run_name(key: str, value: str) -> None:
    if not _RUN_NAME.match(value):
        raise ConfigError(
            f"{key}={value!r} is not valid; use letters, digits, '.', '_' and '-' (it becomes a folder name)"
        )


def _check_not_empty(key: str, value: str) -> None:
    if not value:
        raise ConfigError(f"{key} is empty; give a local folder or s3://bucket/prefix")


def _check_model_preset(key: str, value: str) -> None:
    from speed.models import DIT_PRESETS  # torch + timm: only when a config is validated

    if value not in DIT_PRESETS:
        import difflib

        close = difflib.get_close_matches(value, list(DIT_PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not a known preset{hint}; valid: {', '.join(DIT_PRESETS)}")


def _check_trackers(key: str, value: Any) -> None:
    from speed.train.trackers import check_trackers  # names, and whether mlflow / wandb are installed

    check_trackers(list(value), key)


def _check_http_url(key: str, value: str) -> None:
    if value and not re.match(r"^https?://", value):
        raise ConfigError(f"{key}={value!r} must start with http:// or https:// (e.g. http://minio.local:9000)")


def parse_num_workers(value: Any, key: str = "ray.num_workers") -> Tuple[int, int]:
    """An int n as (n, n), or [min, max] for elastic training; ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        low, high = value
    else:
        raise ConfigError(
            f"{key}={value!r} is not valid; give an int (e.g. 8) or [min, max] for elastic training (e.g. [4, 8])"
        )
    if low < 1 or high < low:
        raise ConfigError(f"{key}={value!r} is not valid; need 1 <= min <= max")
    return low, high


def num_workers_range(ray: RayConfig) -> Tuple[int, int]:
    """``ray.num_workers`` as (min, max); an int n gives (n, n)."""
    return parse_num_workers(ray.num_workers)


def _check_num_workers(key: str, value: Any) -> None:
    parse_num_workers(value, key)


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = checked("digits-speed", _check_run_name)
    # Where runs live: a local folder or s3://bucket/prefix. A run's files go to <output_uri>/<name>.
    output_uri: str = checked("outputs", _check_not_empty)
    seed: int = 0
    # Where the run's metrics, config and sample grids also go (rank 0): any of tensorboard (event
    # files in the run folder), mlflow, wandb. mlflow and wandb need the trackers extra
    # (pip install 'speed[trackers]') and their own settings (MLFLOW_TRACKING_URI, WANDB_MODE, ...).
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"], metadata={"check": _check_trackers})
    # The MLflow experiment / W&B project the run is logged under; None: "speed".
    tracker_project: Optional[str] = None


@dataclass
class RoutingConfig:
    # Token routing (TREAD), training only: per sample, a random `fraction` of the tokens skips
    # blocks start_block .. end_block - 1 and is put back in place before end_block (0-based block
    # indices). 0 turns it off; evaluation, sampling and export always use every token.
    fraction: float = bounded(0.0, 0, 1, max_exclusive=True, hint="0 turns routing off")
    start_block: Optional[int] = non_negative(None, hint="None: 1, so the first block sees every token")
    end_block: Optional[int] = positive(None, hint="None: depth - 1, so the last block sees every token")


@dataclass
class ModelConfig:
    # A preset from speed.models.DIT_PRESETS, e.g. DiT-XL/2, DiT-T/2, LightningDiT-B/2.
    name: str = checked("DiT-T/2", _check_model_preset)
    num_classes: int = positive(10)
    learn_sigma: bool = True
    class_dropout_prob: float = bounded(0.1, 0, 1, max_exclusive=True)
    # Optional preset overrides (None keeps the preset's value).
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    # Block options (timm's layers; None keeps the preset's value: DiT-* presets are layernorm,
    # gelu, no qk-norm, sincos, the exact DiT; LightningDiT-* are rmsnorm, swiglu, qk-norm, rope2d).
    norm: Optional[str] = choice("layernorm", "rmsnorm", default=None)
    mlp: Optional[str] = choice("gelu", "swiglu", default=None)  # swiglu: 2/3 width, same parameter count
    qk_norm: Optional[bool] = None  # normalise queries and keys per head (the block's norm kind)
    # rope2d: 2-D rotary embedding in every attention layer instead of the absolute sin-cos one
    pos_embed: Optional[str] = choice("sincos", "rope2d", default=None)
    routing: RoutingConfig = field(default_factory=RoutingConfig)


@dataclass
class RepaConfig:
    # Representation alignment (REPA), on when `encoder` is set: a timm model name (e.g.
    # vit_base_patch14_dinov2.lvd142m), built without weights and loaded from `weights_uri`
    # (safetensors or a weights-only torch file; nothing is downloaded). Frozen, never optimised.
    encoder: Optional[str] = None
    # The encoder's timm state dict (a classifier head is ignored; missing keys are refused).
    weights_uri: Optional[str] = None
    # Extra timm.create_model arguments (e.g. {img_size: 224}); shapes must fit the weights.
    encoder_kwargs: Dict[str, Any] = field(default_factory=dict)
    # The encoder's input size in pixels; None: its own default (timm's pretrained_cfg input size).
    resolution: Optional[int] = positive(None)
    # Align the hidden states after this many DiT blocks; None: depth // 3 within [1, 8] (8 for XL).
    block: Optional[int] = positive(None)
    weight: float = non_negative(0.5)  # the alignment loss's weight beside the diffusion loss (REPA: 0.5)
    projector_dim: int = positive(2048)  # hidden width of the projector MLP (REPA: 2048)


# Timestep strategies, in the order the registry in speed.diffusion.timesteps lists them (it checks
# that it matches). Each strategy with parameters has a section of the same name in TimestepsConfig;
# these sections hold the only defaults of those parameters.
TIMESTEP_STRATEGIES: Tuple[str, ...] = (
    "uniform",
    "speed",
    "speed_v1",
    "p2",
    "min_snr",
    "logit_normal",
    "lognormal",
    "loss_aware",
    "laplace",
    "learned",
    "progress",
)


@dataclass
class SpeedParams:
    k: float = positive(5.0)  # sampling weight of the acceleration area (t < tau) relative to 1
    tau: int = positive(700)  # start of the convergence area; at most diffusion.num_timesteps
    # change-aware weighting strength: weights (1 - lam) + (2 lam - 1) * change for t < tau
    lam: float = bounded(0.6, 0, 1, min_exclusive=True, hint="outside it some loss weights are <= 0")


@dataclass
class P2Params:
    k: float = non_negative(1.0)
    gamma: float = 1.0


@dataclass
class MinSNRParams:
    gamma: float = positive(5.0)


@dataclass
class LogitNormalParams:
    m: float = 0.0
    s: float = positive(1.0)


@dataclass
class LogNormalParams:
    p_mean: float = -1.2
    p_std: float = positive(1.2)


@dataclass
class LaplaceParams:
    # Laplace density in log-SNR: p(lambda) = exp(-|lambda - mu| / b) / (2 b) (Hang et al. 2024)
    mu: float = 0.0
    b: float = positive(0.5)


@dataclass
class LearnedParams:
    # EDM2-style learned weighting: per-bin log-scale u trained jointly, loss L / exp(u) + u.
    bins: int = bounded(32, 1)  # equal groups of DDPM steps (flow times through their log-SNR cells)
    lr: float = positive(1e-2)  # Adam learning rate of u


@dataclass
class ProgressParams:
    # Sampling that follows per-level learning progress (the relative fall of each level's loss).
    bins: int = bounded(20, 1)  # equal groups of DDPM steps
    fast: float = bounded(0.9, 0, 1, min_exclusive=True, max_exclusive=True)  # fast loss EMA decay
    slow: float = bounded(0.99, 0, 1, min_exclusive=True, max_exclusive=True)  # slow loss EMA decay
    floor: float = bounded(0.25, 0, 1, min_exclusive=True, hint="share of the baseline density kept")
    smoothing: float = non_negative(1.0)  # Gaussian smoothing of progress across bins, in bins
    warmup: int = bounded(8, 1)  # samples every bin must see before the density adapts
    unbiased: bool = False  # weight samples baseline / pmf so the objective stays the baseline's
    # relative: (slow - fast) / slow, the share a level's loss fell; absolute: slow - fast, in loss units
    # (relative favours nearly solved high-noise levels, whose tiny losses fall by large shares).
    measure: str = choice("relative", "absolute")


@dataclass
class LossAwareParams:
    history: int = bounded(10, 1)  # losses kept per step
    uniform_prob: float = bounded(0.001, 0, 1, min_exclusive=True)


@dataclass
class TimestepsConfig:
    # `name` sets both the sampling distribution and the loss weights; `sampling` / `weighting`
    # override either one (e.g. SpeeD sampling with Min-SNR weights). The weighting strategy's
    # weights multiply what that strategy weights: the MSE term, or the whole loss for loss_aware
    # (whose importance weights assume its own sampling, so it cannot weight another sampler).
    name: str = choice(*TIMESTEP_STRATEGIES, default="speed")
    sampling: Optional[str] = choice(*TIMESTEP_STRATEGIES, default=None)
    weighting: Optional[str] = choice(*TIMESTEP_STRATEGIES, default=None)
    # Also weight the VLB term with the (non-importance) weights.
    weight_vb: bool = False
    # Parameters of the strategies that have any (uniform and speed_v1 have none).
    speed: SpeedParams = field(default_factory=SpeedParams)
    p2: P2Params = field(default_factory=P2Params)
    min_snr: MinSNRParams = field(default_factory=MinSNRParams)
    logit_normal: LogitNormalParams = field(default_factory=LogitNormalParams)
    lognormal: LogNormalParams = field(default_factory=LogNormalParams)
    loss_aware: LossAwareParams = field(default_factory=LossAwareParams)
    laplace: LaplaceParams = field(default_factory=LaplaceParams)
    learned: LearnedParams = field(default_factory=LearnedParams)
    progress: ProgressParams = field(default_factory=ProgressParams)


# Training objectives: DDPM (eps prediction, learned sigma, DiT's diffusion) or flow matching on the
# linear path x_t = (1 - t) x0 + t eps with velocity prediction (SiT).
OBJECTIVES: Tuple[str, ...] = ("ddpm", "flow")
DDPM_SAMPLERS: Tuple[str, ...] = ("ddpm", "ddim")
FLOW_SAMPLERS: Tuple[str, ...] = ("euler", "heun", "sde")


@dataclass
class DiffusionConfig:
    objective: str = choice(*OBJECTIVES, hint="flow needs model.learn_sigma=false and a flow sampler")
    # The DDPM noise schedule. Under flow it still places the strategies defined on DDPM steps
    # (SpeeD's tau, P2, Min-SNR) on the flow path, by log-SNR.
    num_timesteps: int = positive(1000)
    schedule: str = choice("linear", "cosine")
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)


@dataclass
class DataConfig:
    # digits: the embedded scikit-learn digits; patches: 10 classes of natural-photo crops (both
    # built in and held in memory, uri ignored); imagefolder | parquet | webdataset | latents read
    # uri (webdataset: the prefix of the .tar shards, or a brace pattern). See docs/data.md.
    format: str = choice("digits", "patches", "imagefolder", "parquet", "webdataset", "latents")
    uri: str = ""
    resolution: int = positive(8)  # a multiple of 8 for latents
    # 1 or 3 for pixels; latents carry their own channel count (4 for SD-VAE)
    channels: int = choice(1, 3, 4)
    on_error: str = choice("skip", "raise")
    random_flip: bool = True
    class_index_uri: Optional[str] = None  # JSON {wnid: label}; default: sorted class folders
    image_column: str = "image"
    label_column: str = "label"
    latent_scale: float = positive(0.18215)
    shuffle_buffer: int = non_negative(256)  # local shuffle buffer (rows) for streamed formats
    prefetch_batches: int = 2
    max_logged_errors: int = 5  # bad files logged in full; after that only counted
    read_cpus: float = positive(0.25)  # CPUs per Ray Data read/decode task
    # JPEG decode: fast (libjpeg scales by 1/2 or 1/4 in the DCT domain when the image is at least
    # twice data.resolution, then ADM's crop) or exact (ADM's recipe on the full-size image)
    decode: str = choice("fast", "exact")
    # The file list, labels and sizes, kept beside the data (or at catalog_uri): auto reuses it
    # while the prefix is unchanged (imagefolder: the same class folders; shards: the same names
    # and sizes) and rebuilds it otherwise; rebuild always lists again; disabled neither reads nor writes it
    catalog: str = choice("auto", "rebuild", "disabled")
    catalog_uri: Optional[str] = None  # default: <data.uri>/_speed_catalog.parquet
    split: str = "train"  # Hugging Face Parquet layout: the split whose data/<split>-*.parquet are read


@dataclass
class OptimConfig:
    lr: float = positive(1e-4)
    weight_decay: float = non_negative(0.0)
    beta1: float = bounded(0.9, 0, 1, max_exclusive=True)
    beta2: float = bounded(0.999, 0, 1, max_exclusive=True)
    eps: float = 1e-8
    warmup_steps: int = non_negative(0)
    grad_clip: float = non_negative(0.0, hint="0 disables clipping")
    implementation: str = choice("auto", "fused", "foreach")


@dataclass
class TrainConfig:
    steps: int = positive(1000)
    global_batch_size: int = positive(64)
    # Largest per-worker micro-batch; gradient accumulation covers the rest of the global batch.
    micro_batch_size: int = positive(64)
    # Schedules, in steps. A value above train.steps means "only at the end".
    log_every: int = bounded(50, 1)
    checkpoint_every: int = bounded(400, 1)
    sample_every: int = non_negative(0, hint="0: only at the end")
    eval_every: int = non_negative(0, hint="0: only at the end")
    # Generated samples per evaluation. None: automatic, scaled to data.resolution; 0 turns the
    # evaluation off.
    eval_num_samples: Optional[int] = non_negative(None, hint="0 turns the evaluation off")
    ema_decay: float = bounded(0.9999, 0, 1, min_exclusive=True, max_exclusive=True, hint="e.g. 0.9999")
    ema_warmup: bool = True
    keep_checkpoints: int = positive(2)
    resume_from: Optional[str] = None  # a DCP checkpoint directory of this run's storage
    init_from: Optional[str] = None  # safetensors weights (weights only)
    on_nonfinite: str = choice("raise", "skip")
    async_checkpoint: bool = False


@dataclass
class ParallelConfig:
    strategy: str = choice("fsdp", "ddp", "none")
    # auto: bf16 on GPU, fp32 on CPU
    mixed_precision: str = choice("auto", "bf16", "fp32")
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class SamplingConfig:
    # ddpm | ddim sample DDPM models; euler | heun | sde (Euler-Maruyama) sample flow models.
    sampler: str = choice(*DDPM_SAMPLERS, *FLOW_SAMPLERS)
    # DDPM: respaced steps, 1 .. diffusion.num_timesteps; flow: intervals of the uniform t grid.
    steps: int = positive(250)
    guidance_scale: float = non_negative(1.0)
    guidance_channels: str = choice("all", "first3")  # first3: DiT's published behaviour
    eta: float = non_negative(0.0)
    clip_denoised: bool = True


@dataclass
class InferenceConfig:
    checkpoint_uri: Optional[str] = None
    output_uri: Optional[str] = None
    num_samples: int = positive(50000)
    batch_size: int = positive(64)
    num_actors: int = positive(1)
    num_gpus_per_actor: float = non_negative(0.0)
    num_cpus_per_actor: float = 1.0
    labels: str = choice("balanced", "random")
    seed: int = 0


@dataclass
class SampleConfig:
    checkpoint_uri: Optional[str] = None
    output_uri: Optional[str] = None  # a .png path or URI
    classes: List[int] = field(default_factory=lambda: list(range(10)))  # each in [0, model.num_classes)
    per_class: int = positive(4)
    seed: int = 0


@dataclass
class EvalConfig:
    samples_uri: Optional[str] = None
    reference_uri: Optional[str] = None
    # digits: a small classifier trained on the dataset being trained (the in-training evaluation's
    # fid_<dataset>; for python -m ray_jobs.evaluate, the digits classifier); inception: Inception-v3
    feature_extractor: str = choice("digits", "inception")
    inception_weights: Optional[str] = None
    classifier_uri: Optional[str] = None  # digits classifier cache (ray_jobs.evaluate); default under run.output_uri
    # The in-training evaluators' cache folder, one file per dataset; default <run.output_uri>/cache
    cache_uri: Optional[str] = None
    batch_size: int = positive(250)
    num_actors: int = positive(1)
    num_gpus_per_actor: float = 0.0
    pr_k: int = positive(3)


@dataclass
class PrepareConfig:
    # digits: write the digits; convert: rewrite prepare.source_uri in prepare.format (image bytes
    # copied as they are); encode: SD-VAE latents of prepare.source_uri
    task: str = choice("digits", "convert", "encode")
    output_uri: Optional[str] = None
    format: str = choice("imagefolder", "parquet", "webdataset")  # digits and convert tasks
    image_size: int = positive(32)
    channels: int = choice(1, 3, default=3)
    num_shards: int = positive(4)
    source_uri: Optional[str] = None  # convert / encode tasks: the dataset to read
    source_format: str = choice("imagefolder", "parquet", "webdataset")
    resolution: int = 256
    batch_size: int = 32
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    rows_per_shard: int = positive(1024)  # encode: images per latent shard; convert: per Parquet / tar shard
    # encode: also store each image's clean center crop (unflipped) beside its latents, which REPA
    # on data.format=latents needs (its encoder sees the image, never the latent); see
    # docs/accelerators.md for the storage cost
    keep_images: bool = False
    # encode, keep_images: side of the stored image in pixels (at most prepare.resolution); None:
    # prepare.resolution
    image_resolution: Optional[int] = positive(None)
    # encode, keep_images: png (lossless) or jpeg (quality 95, a few times smaller)
    image_format: str = choice("png", "jpeg")


@dataclass
class VAEConfig:
    path: Optional[str] = None  # folder or URI of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema)
    scale_factor: float = 0.18215
    dtype: str = choice("fp32", "bf16", "fp16")


@dataclass
class RayConfig:
    # int, or [min, max] for elastic training
    num_workers: Any = checked(1, _check_num_workers)
    use_gpu: bool = False
    # CPUs each Train worker reserves: a number > 0, or "auto" (the training job decides).
    cpus_per_worker: Any = positive("auto", also=("auto",))
    max_failures: int = non_negative(0, also=(-1,), hint="-1: retry forever")
    # elastic runs only: how often a running worker group checks whether more workers now fit
    resize_interval_s: float = positive(60.0, hint="seconds between resize checks")
    address: Optional[str] = None  # default: RAY_ADDRESS, else a local Ray
    num_cpus: Optional[int] = None  # local Ray only; default: all CPUs
    worker_timeout_s: int = 600


@dataclass
class StorageConfig:
    # Settings for s3:// URIs; each falls back to the standard AWS environment variable.
    endpoint_url: Optional[str] = checked(None, _check_http_url)  # AWS_ENDPOINT_URL
    region: Optional[str] = None  # AWS_DEFAULT_REGION
    path_style: bool = False  # path-style addressing (MinIO, Ceph)
    access_key_id: Optional[str] = None  # AWS_ACCESS_KEY_ID
    secret_access_key: Optional[str] = None  # AWS_SECRET_ACCESS_KEY
    connect_timeout_s: float = 5.0


@dataclass
class TuneConfig:
    name: Optional[str] = None  # experiment name; default: the ablation file's stem
    output_uri: Optional[str] = None  # default: run.output_uri
    # Dotted config key -> list of values (grid) or {"grid": [...]} / {"choice": [...]} /
    # {"uniform": [lo, hi]} / {"loguniform": [lo, hi]}. Every key must exist in this schema.
    search_space: Dict[str, Any] = field(default_factory=dict)
    # A metric the training loop logs; fid = the in-training FID of the dataset, fid_<dataset>
    metric: str = "fid"
    mode: str = choice("min", "max")
    num_samples: int = positive(1)
    scheduler: str = choice("none", "asha")
    grace_period: int = 1
    max_concurrent_trials: int = positive(1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
