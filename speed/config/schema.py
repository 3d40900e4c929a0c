"""Typed configuration: one dataclass per section.

Every component receives only its own section (``parallelize(model, parallel=cfg.parallel, ...)``).
OmegaConf merges YAML and ``key=value`` overrides onto these dataclasses (see ``load.py``), which
rejects unknown keys and wrong types; ``validate_config`` then checks values and names the full
dotted key in every message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and how to fix it."""


@dataclass
class RunConfig:
    name: str = "digits-speed"
    # Where runs live: a local folder or s3://bucket/prefix. A run's files go to <output_uri>/<name>.
    output_uri: str = "outputs"
    seed: int = 0


@dataclass
class ModelConfig:
    # A preset from speed.models.DIT_PRESETS, e.g. DiT-XL/2, DiT-T/2.
    name: str = "DiT-T/2"
    num_classes: int = 10
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # Optional preset overrides (None keeps the preset's value).
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None


@dataclass
class SpeedParams:
    k: float = 5.0  # sampling weight of the acceleration area (t < tau) relative to 1
    tau: int = 700  # start of the convergence area
    lam: float = 0.6  # change-aware weighting strength


@dataclass
class SpeedV1Params:
    pass


@dataclass
class P2Params:
    k: float = 1.0
    gamma: float = 1.0


@dataclass
class MinSNRParams:
    gamma: float = 5.0


@dataclass
class LogitNormalParams:
    m: float = 0.0
    s: float = 1.0


@dataclass
class LogNormalParams:
    p_mean: float = -1.2
    p_std: float = 1.2


@dataclass
class LossAwareParams:
    history: int = 10
    uniform_prob: float = 0.001


@dataclass
class TimestepsConfig:
    # `name` sets both the sampling distribution and the loss weights; `sampling` / `weighting`
    # override either one (e.g. SpeeD sampling with Min-SNR weights). The weighting strategy's
    # weights multiply what that strategy weights: the MSE term, or the whole loss for loss_aware
    # (whose importance weights assume its own sampling, so it cannot weight another sampler).
    name: str = "speed"
    sampling: Optional[str] = None
    weighting: Optional[str] = None
    # Also weight the VLB term with the (non-importance) weights.
    weight_vb: bool = False
    speed: SpeedParams = field(default_factory=SpeedParams)
    speed_v1: SpeedV1Params = field(default_factory=SpeedV1Params)
    p2: P2Params = field(default_factory=P2Params)
    min_snr: MinSNRParams = field(default_factory=MinSNRParams)
    logit_normal: LogitNormalParams = field(default_factory=LogitNormalParams)
    lognormal: LogNormalParams = field(default_factory=LogNormalParams)
    loss_aware: LossAwareParams = field(default_factory=LossAwareParams)

    def strategy_params(self, strategy: str) -> Dict[str, Any]:
        return dataclasses.asdict(getattr(self, strategy))


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)


@dataclass
class DataConfig:
    # digits: the embedded scikit-learn digits (uri ignored); imagefolder | parquet | latents read uri.
    format: str = "digits"
    uri: str = ""
    resolution: int = 8
    channels: int = 1  # 1 or 3 for pixels; latents carry their own channel count (4 for SD-VAE)
    on_error: str = "skip"  # skip | raise
    random_flip: bool = True
    class_index_uri: Optional[str] = None  # JSON {wnid: label}; default: sorted class folders
    image_column: str = "image"
    label_column: str = "label"
    latent_scale: float = 0.18215
    shuffle_buffer: int = 256  # local shuffle buffer (rows) for streamed formats
    prefetch_batches: int = 2
    max_logged_errors: int = 5  # bad files logged in full; after that only counted
    read_cpus: float = 0.25  # CPUs per Ray Data read/decode task


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    implementation: str = "auto"  # auto | fused | foreach


@dataclass
class TrainConfig:
    steps: int = 1200
    global_batch_size: int = 64
    # Largest per-worker micro-batch; gradient accumulation covers the rest of the global batch.
    micro_batch_size: int = 64
    log_every: int = 50
    checkpoint_every: int = 400
    sample_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    eval_num_samples: int = 500
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    keep_checkpoints: int = 2
    resume_from: Optional[str] = None  # a DCP checkpoint directory of this run's storage
    init_from: Optional[str] = None  # safetensors weights (weights only)
    on_nonfinite: str = "raise"  # raise | skip
    async_checkpoint: bool = False


@dataclass
class ParallelConfig:
    strategy: str = "fsdp"  # fsdp | ddp | none
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class SamplingConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 250
    guidance_scale: float = 1.0
    guidance_channels: str = "all"  # all | first3 (DiT's published behaviour)
    eta: float = 0.0
    clip_denoised: bool = True


@dataclass
class InferenceConfig:
    checkpoint_uri: Optional[str] = None
    output_uri: Optional[str] = None
    num_samples: int = 50000
    batch_size: int = 64
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    labels: str = "balanced"  # balanced | random
    seed: int = 0


@dataclass
class SampleConfig:
    checkpoint_uri: Optional[str] = None
    output_uri: Optional[str] = None  # a .png path or URI
    classes: List[int] = field(default_factory=lambda: list(range(10)))
    per_class: int = 4
    seed: int = 0


@dataclass
class EvalConfig:
    samples_uri: Optional[str] = None
    reference_uri: Optional[str] = None
    feature_extractor: str = "digits"  # digits | inception
    inception_weights: Optional[str] = None
    classifier_uri: Optional[str] = None  # digits classifier cache; default under run.output_uri
    batch_size: int = 250
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    pr_k: int = 3


@dataclass
class PrepareConfig:
    task: str = "digits"  # digits | encode
    output_uri: Optional[str] = None
    format: str = "imagefolder"  # imagefolder | parquet (digits task)
    image_size: int = 32
    channels: int = 3
    num_shards: int = 4
    source_uri: Optional[str] = None  # encode task: the imagefolder/parquet dataset to encode
    source_format: str = "imagefolder"
    resolution: int = 256
    batch_size: int = 32
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    rows_per_shard: int = 1024


@dataclass
class VAEConfig:
    path: Optional[str] = None  # folder or URI of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema)
    scale_factor: float = 0.18215
    dtype: str = "fp32"  # fp32 | bf16 | fp16


@dataclass
class RayConfig:
    # int, or [min, max] for elastic training
    num_workers: Any = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    # elastic runs only: how often a running worker group checks whether more workers now fit
    resize_interval_s: float = 60.0
    address: Optional[str] = None  # default: RAY_ADDRESS, else a local Ray
    num_cpus: Optional[int] = None  # local Ray only; default: all CPUs
    worker_timeout_s: int = 600


@dataclass
class StorageConfig:
    # Settings for s3:// URIs; each falls back to the standard AWS environment variable.
    endpoint_url: Optional[str] = None  # AWS_ENDPOINT_URL
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
    # {"uniform": [lo, hi]} / {"loguniform": [lo, hi]}.
    search_space: Dict[str, Any] = field(default_factory=dict)
    metric: str = "digits_fid"
    mode: str = "min"
    num_samples: int = 1
    scheduler: str = "none"  # none | asha
    grace_period: int = 1
    max_concurrent_trials: int = 1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
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
