"""diffusers interop: our DiT exports <-> diffusers' ``DiTTransformer2DModel`` / ``DiTPipeline``.

Our DiT keeps the reference (facebookresearch/DiT) parameter layout; diffusers re-arranges the
same network (``DiTTransformer2DModel``), as its own DiT conversion script does:

  x_embedder.proj                   pos_embed.proj
  t_embedder.mlp.0 / .2             transformer_blocks.<i>.norm1.emb.timestep_embedder.linear_1 / 2
  y_embedder.embedding_table        transformer_blocks.<i>.norm1.emb.class_embedder.embedding_table
                                    (one timestep and one class embedder in DiT: a copy per block)
  blocks.<i>.adaLN_modulation.1     transformer_blocks.<i>.norm1.linear
  blocks.<i>.attn.qkv               transformer_blocks.<i>.attn1.to_q / to_k / to_v (split in three)
  blocks.<i>.attn.proj              transformer_blocks.<i>.attn1.to_out.0
  blocks.<i>.mlp.fc1 / fc2          transformer_blocks.<i>.ff.net.0.proj / ff.net.2
  final_layer.adaLN_modulation.1    proj_out_1
  final_layer.linear                proj_out_2
  pos_embed (fixed sin-cos buffer)  not stored: diffusers computes the same table itself

What differs, and how it is handled:

- Classes. ``DiTPipeline`` uses class id 1000 as the null ("unconditional") label for classifier-free
  guidance whatever the model, so a model with fewer classes gets a class table of 1001 rows: its
  own classes first, the null embedding at row 1000 and in the unused rows between. The real class
  count is in ``speed_model.json`` and the model card; the import trims the table back.
- Learned sigma. A ``learn_sigma`` model outputs 2 x in_channels (noise, then the variance
  interpolation); ``DiTPipeline`` keeps the noise half and samples with the scheduler's fixed
  variance, so the exported scheduler is a ``DDPMScheduler`` with ``variance_type=fixed_small``.
- Timestep frequencies. diffusers' DiT embeds timesteps with ``downscale_freq_shift=1``
  (frequencies ``10000**(-k/127)``), DiT with ``10000**(-k/128)``; the weights are the same, the
  sinusoid is not. ``use_dit_timestep_frequencies`` sets a loaded transformer to DiT's, after which
  its forward equals ours; a stock ``from_pretrained`` keeps diffusers' (as facebook/DiT-XL-2-256
  does), which changes the output a little (see docs/interop.md for the measured size).

The conversion itself is plain PyTorch and safetensors; diffusers is imported only to build and
save its objects. Nothing is downloaded: a VAE comes from a local folder or object storage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from speed import storage
from speed.config.schema import ModelConfig, StorageConfig
from speed.models.export import WeightsError, save_export
from speed.models.registry import DIT_PRESETS, ModelDescription

log = logging.getLogger("speed.models")

# DiTPipeline hard-codes this class id as the null label of classifier-free guidance.
PIPELINE_NULL_CLASS = 1000
SPEED_FILE = "speed_model.json"  # our model description (and export facts) beside config.json
CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SCHEDULER_FILE = "scheduler_config.json"
MODEL_INDEX_FILE = "model_index.json"
TRANSFORMER_DIR = "transformer"
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIT_NORM_EPS = 1e-6  # DiT's LayerNorms; diffusers' default (1e-5) would change the output
DDPM_MESSAGE = ("DiTPipeline samples DDPM (noise-prediction) models only; this is a flow (velocity) model, so only "
                "its transformer was exported: sample it with a flow sampler (e.g. diffusers' "
                "FlowMatchEulerDiscreteScheduler in your own loop, or python -m ray_jobs.sample)")


class InteropError(WeightsError):
    """A model or folder that cannot cross between the two layouts; the message says why and what to do."""


# --- the model's shape in diffusers' terms --------------------------------------------------------


def objective_of(description: ModelDescription) -> str:
    return getattr(description, "objective", "ddpm") or "ddpm"


def check_exportable(description: ModelDescription) -> None:
    """Refuse models diffusers' DiT cannot represent, naming the option that is in the way."""
    model = description.build(device="meta")
    options = getattr(model, "options", None)
    if options is not None and dataclasses.is_dataclass(options):
        dit_options = type(options)()
        for item in dataclasses.fields(options):
            value, dit_value = getattr(options, item.name), getattr(dit_options, item.name)
            if value != dit_value:
                raise InteropError(
                    f"model.{item.name}={value!r} (preset {description.model.get('name')}) has no counterpart in "
                    f"diffusers' DiTTransformer2DModel, which is DiT's block ({item.name}={dit_value!r}); only "
                    "models with DiT's own blocks can be exported to diffusers"
                )
    hidden = model.blocks[0].adaLN_modulation[-1].in_features
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    if mlp_hidden != 4 * hidden:
        raise InteropError(
            f"model.mlp_ratio={mlp_hidden / hidden:g}: diffusers' DiTTransformer2DModel has MLPs of 4 x hidden_size "
            "only; export models trained with mlp_ratio 4 (the preset's)"
        )


def _geometry(description: ModelDescription) -> Dict[str, int]:
    model_cfg = description.model_config()
    preset = DIT_PRESETS[model_cfg.name]
    depth = model_cfg.depth or preset["depth"]
    hidden = model_cfg.hidden_size or preset["hidden_size"]
    heads = model_cfg.num_heads or preset["num_heads"]
    return dict(depth=depth, hidden=hidden, heads=heads, patch=preset["patch_size"])


def diffusers_table_size(num_classes: int) -> int:
    """``num_embeds_ada_norm`` of the export: at least 1000, so DiTPipeline's null id 1000 is the null class."""
    return max(int(num_classes), PIPELINE_NULL_CLASS)


def diffusers_config(description: ModelDescription) -> Dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments of the model a description builds."""
    geometry = _geometry(description)
    model_cfg = description.model_config()
    in_channels = int(description.in_channels)
    return dict(
        num_attention_heads=geometry["heads"],
        attention_head_dim=geometry["hidden"] // geometry["heads"],
        in_channels=in_channels,
        out_channels=2 * in_channels if model_cfg.learn_sigma else in_channels,
        num_layers=geometry["depth"],
        dropout=0.0,
        attention_bias=True,
        sample_size=int(description.input_size),
        patch_size=geometry["patch"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=diffusers_table_size(model_cfg.num_classes),
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=DIT_NORM_EPS,
    )


# --- state dicts ---------------------------------------------------------------------------------

_BLOCK_MAP = (  # ours (under blocks.<i>.) -> diffusers (under transformer_blocks.<i>.)
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
)
_TOP_MAP = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
_TIMESTEP_MAP = (("t_embedder.mlp.0", "timestep_embedder.linear_1"), ("t_embedder.mlp.2", "timestep_embedder.linear_2"))
_CLASS_TABLE = "class_embedder.embedding_table.weight"
_OUR_TABLE = "y_embedder.embedding_table.weight"
_EMB = "transformer_blocks.{i}.norm1.emb."


def _depth_of(tensors: Dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in tensors if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise InteropError(f"blocks are not numbered 0..n-1 ({sorted(indices)[:5]}...)")
    return len(indices)


def to_diffusers_state_dict(tensors: Dict[str, torch.Tensor], num_classes: int,
                            has_null_class: bool) -> Dict[str, torch.Tensor]:
    """Our DiT state dict -> ``DiTTransformer2DModel``'s (every tensor a copy; no shared storage)."""
    ours = dict(tensors)
    ours.pop("pos_embed", None)  # fixed sin-cos table: diffusers computes the same one
    out: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in ours:
            raise InteropError(f"the weights have no '{name}'; they are not a DiT state dict")
        return ours.pop(name)

    for src, dst in _TOP_MAP:
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = take(f"{src}.{leaf}").clone()
    depth = _depth_of(ours, "blocks.")
    timestep = {f"{dst}.{leaf}": take(f"{src}.{leaf}") for src, dst in _TIMESTEP_MAP for leaf in ("weight", "bias")}
    table = _diffusers_class_table(take(_OUR_TABLE), num_classes, has_null_class)
    for i in range(depth):
        ours_block, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for src, dst in _BLOCK_MAP:
            for leaf in ("weight", "bias"):
                out[f"{theirs}{dst}.{leaf}"] = take(f"{ours_block}{src}.{leaf}").clone()
        for leaf in ("weight", "bias"):
            for name, value in zip(("to_q", "to_k", "to_v"), take(f"{ours_block}attn.qkv.{leaf}").chunk(3, dim=0)):
                out[f"{theirs}attn1.{name}.{leaf}"] = value.clone()
        for name, value in timestep.items():
            out[_EMB.format(i=i) + name] = value.clone()
        out[_EMB.format(i=i) + _CLASS_TABLE] = table.clone()
    if ours:
        raise InteropError(
            f"the weights hold {len(ours)} tensor(s) diffusers' DiT has no place for (e.g. '{sorted(ours)[0]}'); "
            "only models with DiT's own blocks can be exported"
        )
    return out


def _diffusers_class_table(table: torch.Tensor, num_classes: int, has_null_class: bool) -> torch.Tensor:
    """[num_classes (+1 null), D] -> [max(num_classes, 1000) + 1, D], the null row last (and in the padding)."""
    rows = diffusers_table_size(num_classes) + 1
    null = table[num_classes] if has_null_class else torch.zeros_like(table[0])
    out = null.expand(rows, table.shape[1]).clone()
    out[:num_classes] = table[:num_classes]
    return out


def from_diffusers_state_dict(tensors: Dict[str, torch.Tensor], num_classes: int,
                              has_null_class: bool) -> Dict[str, torch.Tensor]:
    """``DiTTransformer2DModel``'s state dict -> ours (without ``pos_embed``). Refused, naming the
    block, when the per-block timestep/class embedders are not all the same (ours has one)."""
    theirs = {k: v for k, v in tensors.items() if k != "pos_embed.pos_embed"}
    out: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise InteropError(f"the diffusers weights have no '{name}'; they are not a DiTTransformer2DModel")
        return theirs.pop(name)

    for dst, src in _TOP_MAP:
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = take(f"{src}.{leaf}").clone()
    depth = _depth_of(theirs, "transformer_blocks.")
    if depth == 0:
        raise InteropError("the diffusers weights have no transformer_blocks")
    shared: Dict[str, torch.Tensor] = {}
    for i in range(depth):
        ours_block, block = f"blocks.{i}.", f"transformer_blocks.{i}."
        for dst, src in _BLOCK_MAP:
            for leaf in ("weight", "bias"):
                out[f"{ours_block}{dst}.{leaf}"] = take(f"{block}{src}.{leaf}").clone()
        for leaf in ("weight", "bias"):
            parts = [take(f"{block}attn1.{name}.{leaf}") for name in ("to_q", "to_k", "to_v")]
            out[f"{ours_block}attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
        names = [f"{dst}.{leaf}" for _, dst in _TIMESTEP_MAP for leaf in ("weight", "bias")] + [_CLASS_TABLE]
        for name in names:
            value = take(_EMB.format(i=i) + name)
            if i == 0:
                shared[name] = value
            elif value.shape != shared[name].shape or not torch.equal(value, shared[name]):
                raise InteropError(
                    f"transformer_blocks.{i}: its embedder '{_EMB.format(i=i)}{name}' differs from "
                    "transformer_blocks.0's. Our DiT has one timestep and one class embedder shared by every block "
                    "(DiT's layout), so a model whose per-block embedders were trained apart cannot be imported"
                )
    for dst, src in _TIMESTEP_MAP:
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = shared[f"{src}.{leaf}"].clone()
    table = shared[_CLASS_TABLE]
    if table.shape[0] < num_classes + 1:
        raise InteropError(f"the class table has {table.shape[0]} rows, fewer than {num_classes} classes + null")
    rows = [table[:num_classes]] + ([table[-1:]] if has_null_class else [])
    out[_OUR_TABLE] = torch.cat(rows, dim=0).clone()
    if theirs:
        raise InteropError(
            f"the diffusers weights hold {len(theirs)} tensor(s) our DiT has no place for (e.g. '{sorted(theirs)[0]}')"
        )
    return out


# --- diffusers objects ---------------------------------------------------------------------------


def to_diffusers_transformer(tensors: Dict[str, torch.Tensor], description: ModelDescription):
    """A ``DiTTransformer2DModel`` holding exactly the given weights of the described DiT."""
    from diffusers import DiTTransformer2DModel

    check_exportable(description)
    model_cfg = description.model_config()
    state = to_diffusers_state_dict(tensors, model_cfg.num_classes, model_cfg.class_dropout_prob > 0)
    transformer = DiTTransformer2DModel(**diffusers_config(description))
    transformer.load_state_dict(state, strict=True)
    return transformer.eval().requires_grad_(False)


def use_dit_timestep_frequencies(transformer) -> Any:
    """Make a loaded ``DiTTransformer2DModel`` embed timesteps with DiT's frequencies (``10000**(-k/128)``)
    instead of diffusers' (``10000**(-k/127)``); its forward then equals our DiT's. Returns it."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def ddpm_scheduler_config(description: ModelDescription) -> Dict[str, Any]:
    """A ``DDPMScheduler`` over our betas (linear or cosine, ``num_timesteps``), noise prediction."""
    from speed.diffusion.gaussian import get_beta_schedule

    steps = int(description.num_timesteps)
    config: Dict[str, Any] = dict(num_train_timesteps=steps, prediction_type="epsilon", variance_type="fixed_small",
                                  clip_sample=not description.is_latent, clip_sample_range=1.0,
                                  timestep_spacing="leading")
    if description.schedule == "linear":
        betas = get_beta_schedule("linear", steps)
        config.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]))
    elif description.schedule == "cosine":
        config.update(beta_schedule="squaredcos_cap_v2")
    else:
        raise InteropError(f"diffusion.schedule={description.schedule!r} has no diffusers scheduler here")
    return config


def ddpm_scheduler(description: ModelDescription):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**ddpm_scheduler_config(description))


def imagenet_id2label() -> Dict[int, str]:
    """ImageNet-1k class descriptions (``"tench, Tinca tinca"``) by index, as DiTPipeline's id2label
    (timm ships the list; the indices are the sorted-wnid order DiT and our imagefolder reader use)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {i: info.index_to_description(i) for i in range(info.num_classes())}


class PixelSpaceDecoder(torch.nn.Module):
    """A stand-in for ``DiTPipeline``'s VAE when the model works on pixels (e.g. the digits): the
    pipeline divides by ``config.scaling_factor`` (1 here) and calls ``decode``, which returns the
    pixels as they are. Build the pipeline in Python with ``DiTPipeline(transformer, vae=PixelSpaceDecoder(), scheduler)``."""

    class _Config(dict):
        __getattr__ = dict.get

    class _Decoded:
        def __init__(self, sample: torch.Tensor):
            self.sample = sample

    def __init__(self) -> None:
        super().__init__()
        self.config = self._Config(scaling_factor=1.0)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to(device, dtype)

    @property
    def device(self) -> torch.device:  # what DiffusionPipeline asks its components
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def decode(self, latents: torch.Tensor) -> "PixelSpaceDecoder._Decoded":
        return self._Decoded(latents)


# --- sources: our weights, their description and training config -------------------------------


def _training_config(source, storage_cfg: Optional[StorageConfig]) -> Dict[str, Any]:
    """The resolved (redacted) config a model was trained with, where the run left it: a checkpoint's
    state.json, or the run folder's config.yaml beside ``<run>/export/``. Empty when unknown."""
    from speed.sample.weights import parent_uri
    from speed.train.checkpoint import STATE_FILE
    from speed.train.run_layout import CONFIG_NAME, EXPORT_DIR

    try:
        if source.is_checkpoint:
            return json.loads(storage.read_text(storage.join(source.uri, STATE_FILE), storage_cfg)).get("config") or {}
        folder = parent_uri(source.uri)
        if folder.rstrip("/").rsplit("/", 1)[-1] == EXPORT_DIR:
            config_uri = storage.join(parent_uri(folder), CONFIG_NAME)
            if storage.exists(config_uri, storage_cfg):
                return json.loads(storage.read_text(config_uri, storage_cfg))
    except (ValueError, OSError) as exc:
        log.warning("could not read the training config of %s (%s); the model card leaves it out", source.uri, exc)
    return {}


def _strategy_text(config: Dict[str, Any]) -> str:
    timesteps = (config.get("diffusion") or {}).get("timesteps") or {}
    name = timesteps.get("name")
    if not name:
        return "not recorded with these weights"

    def with_params(strategy: str) -> str:
        params = timesteps.get(strategy)
        if not isinstance(params, dict) or not params:
            return strategy
        return f"{strategy} ({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"

    sampling, weighting = timesteps.get("sampling") or name, timesteps.get("weighting") or name
    if sampling == weighting == name:
        return with_params(name)
    return f"{name}: sampling {with_params(sampling)}, weighting {with_params(weighting)}"


def _data_text(description: ModelDescription, config: Dict[str, Any]) -> str:
    data = config.get("data") or {}
    where = data.get("uri") if data.get("format", description.data_format) != "digits" else "scikit-learn's 8x8 digits"
    space = (f"SD-VAE latents ({description.in_channels} x {description.input_size} x {description.input_size}, "
             f"latent scale {description.latent_scale:g})" if description.is_latent else
             f"pixels ({description.in_channels} x {description.input_size} x {description.input_size}, in [-1, 1])")
    classes = description.model_config().num_classes
    return (f"{description.data_format}{f' from {where}' if where else ''}; {description.resolution}px images as "
            f"{space}; {classes} classes")


def _classes_text(model_cfg: ModelConfig) -> str:
    if model_cfg.class_dropout_prob <= 0:
        return (f"{model_cfg.num_classes}, no null class (trained without label dropout): use guidance_scale=1")
    null = diffusers_table_size(model_cfg.num_classes) if model_cfg.num_classes >= PIPELINE_NULL_CLASS else PIPELINE_NULL_CLASS
    return f"{model_cfg.num_classes}; class id {null} is the null class of classifier-free guidance"


def model_card(description: ModelDescription, config: Dict[str, Any], *, source: str, pipeline: bool,
               notes: List[str]) -> str:
    """The README.md of an export folder: what the model is, how it was trained, how to load it."""
    objective = objective_of(description)
    model_cfg = description.model_config()
    geometry = _geometry(description)
    train = config.get("train") or {}
    predicts = ("the velocity of the linear path x_t = (1 - t) x0 + t eps (flow matching)" if objective == "flow"
                else "the noise eps" + (" and the variance interpolation (learned sigma: 2 x in_channels outputs)"
                                        if model_cfg.learn_sigma else ""))
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: unconditional-image-generation",
        "tags: [dit, class-conditional, speed-timesteps]",
        "---",
        "",
        f"# {model_cfg.name} ({objective}), step {description.step}",
        "",
        f"A class-conditional diffusion transformer trained with the SpeeD trainer, exported from `{source}`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| objective | {objective}: predicts {predicts} |",
        f"| timestep strategy | {_strategy_text(config)} |",
        f"| data | {_data_text(description, config)} |",
        f"| noise schedule | {description.schedule}, {description.num_timesteps} steps |",
        f"| architecture | {model_cfg.name}: depth {geometry['depth']}, hidden {geometry['hidden']}, "
        f"{geometry['heads']} heads, patch {geometry['patch']} |",
        f"| training steps | {description.step}" + (f" of {train['steps']}, global batch {train.get('global_batch_size')}"
                                                      if train.get("steps") else "") + " |",
        f"| classes | {_classes_text(model_cfg)} |",
        "",
    ]
    if pipeline:
        lines += ["## Use", "", "```python", "import torch",
                  "from diffusers import DiTPipeline", "", "pipe = DiTPipeline.from_pretrained(FOLDER)",
                  "images = pipe(class_labels=[0, 1], num_inference_steps=50, guidance_scale=1.5,",
                  "              generator=torch.manual_seed(0)).images", "```", ""]
    else:
        lines += ["## Use", "", "```python", "from diffusers import DiTTransformer2DModel", "",
                  "transformer = DiTTransformer2DModel.from_pretrained(FOLDER)", "```", ""]
        if objective != "flow":
            lines += ["`scheduler_config.json` here is the matching `DDPMScheduler` "
                      "(`DDPMScheduler.from_pretrained(FOLDER)`); with a VAE, `DiTPipeline(transformer=..., vae=..., "
                      "scheduler=...)` samples it.", ""]
    lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [
        "- diffusers' DiT embeds timesteps with slightly different sinusoid frequencies than DiT "
        "(`downscale_freq_shift=1`); for outputs identical to the trainer's, call "
        "`speed.models.diffusers_interop.use_dit_timestep_frequencies(transformer)` after loading.",
        f"- `{SPEED_FILE}` holds the trainer's model description; "
        "`python -m ray_jobs.export_diffusers FOLDER EXPORT_DIR` turns this folder back into a trainer export.",
        "",
    ]
    return "\n".join(lines)


# --- export: ours -> diffusers -------------------------------------------------------------------


def _write_folder(local: Path, dst_uri: str, storage_cfg: Optional[StorageConfig]) -> None:
    """Copy a local folder's files to ``dst_uri`` (a local folder or s3:// prefix)."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(dst_uri, *path.relative_to(local).parts), path.read_bytes(), storage_cfg)


def _check_dst(dst_uri: str, storage_cfg: Optional[StorageConfig], key: str = "DST") -> None:
    if storage.exists(dst_uri, storage_cfg) and not storage.is_dir(dst_uri, storage_cfg):
        raise InteropError(f"{key}: '{dst_uri}' is a file; give a folder to write")
    if storage.is_dir(dst_uri, storage_cfg) and storage.list_files(dst_uri, storage_cfg, recursive=False):
        raise InteropError(f"{key}: '{dst_uri}' is not empty; give a new or empty folder")


def load_vae_folder(vae_uri: str, storage_cfg: Optional[StorageConfig]):
    """The diffusers ``AutoencoderKL`` at a local folder or s3:// prefix (safetensors only)."""
    from speed.data.vae import load_vae

    return load_vae(vae_uri, storage_cfg).model


def export_to_diffusers(src_uri: str, dst_uri: str, *, vae_uri: Optional[str] = None,
                        storage_cfg: Optional[StorageConfig] = None) -> Dict[str, Any]:
    """Write the model behind ``src_uri`` (any export, .safetensors, checkpoint or run folder) as a
    diffusers folder at ``dst_uri``: a ``DiTTransformer2DModel`` folder, or with ``vae_uri`` a whole
    ``DiTPipeline`` folder. Returns what was written."""
    from speed.sample.weights import load_sampling_model, resolve_weights

    source = resolve_weights(src_uri, storage_cfg, key="SRC")
    _check_dst(dst_uri, storage_cfg)
    model, description = load_sampling_model(source, storage_cfg, key="SRC")
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    del model
    config = _training_config(source, storage_cfg)
    objective = objective_of(description)
    transformer = to_diffusers_transformer(tensors, description)
    num_classes = description.model_config().num_classes
    notes: List[str] = []
    want_pipeline = vae_uri is not None
    if objective == "flow":
        notes.append(DDPM_MESSAGE)
        if want_pipeline:
            log.warning("%s", DDPM_MESSAGE)
        want_pipeline = False
    elif want_pipeline and not description.is_latent:
        raise InteropError(
            f"--vae: this model works on pixels (data.format={description.data_format}), not VAE latents, so a "
            "DiTPipeline with a VAE would decode its pixels as latents; export without --vae, and sample with "
            "DiTPipeline(transformer, vae=speed.models.diffusers_interop.PixelSpaceDecoder(), scheduler) "
            "(docs/interop.md)"
        )
    if num_classes > PIPELINE_NULL_CLASS:
        notes.append(f"{num_classes} classes: DiTPipeline uses class id {PIPELINE_NULL_CLASS} as the null class, "
                     f"which is a real class here; use guidance_scale=1 with DiTPipeline (the null class is "
                     f"id {num_classes})")
    if description.model_config().learn_sigma:
        notes.append("learned sigma: the transformer outputs 2 x in_channels; DiTPipeline keeps the noise half and "
                     "samples with the scheduler's fixed variance (the trainer's ddpm sampler uses the learned one)")
    speed_meta = {"description": json.loads(description.to_json()), "source": source.given,
                  "num_classes": num_classes, "has_null_class": description.model_config().class_dropout_prob > 0,
                  "format_version": 1}

    workdir = Path(tempfile.mkdtemp(prefix="speed-diffusers-"))
    try:
        out = workdir / "out"
        if want_pipeline:
            from diffusers import DiTPipeline

            vae = load_vae_folder(vae_uri, storage_cfg)
            if int(vae.config.latent_channels) != int(description.in_channels):
                raise InteropError(f"--vae: '{vae_uri}' has {vae.config.latent_channels} latent channels, the model "
                                   f"{description.in_channels}; give the VAE its latents were encoded with")
            if abs(float(vae.config.scaling_factor) - float(description.latent_scale)) > 1e-9:
                notes.append(f"the VAE's scaling_factor was set to the latents' scale {description.latent_scale:g} "
                             f"(it said {vae.config.scaling_factor:g})")
                vae.register_to_config(scaling_factor=float(description.latent_scale))
            id2label = imagenet_id2label() if num_classes == 1000 else None
            pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=ddpm_scheduler(description), id2label=id2label)
            pipe.save_pretrained(out, safe_serialization=True)
            if id2label is not None:
                index_path = out / MODEL_INDEX_FILE
                index = json.loads(index_path.read_text())
                index["id2label"] = {str(k): v for k, v in id2label.items()}
                index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (out / TRANSFORMER_DIR / SPEED_FILE).write_text(json.dumps(speed_meta, indent=1, sort_keys=True) + "\n")
        else:
            transformer.save_pretrained(out, safe_serialization=True)
            if objective != "flow":
                ddpm_scheduler(description).save_pretrained(out)
            (out / SPEED_FILE).write_text(json.dumps(speed_meta, indent=1, sort_keys=True) + "\n")
        (out / CARD_FILE).write_text(model_card(description, config, source=source.given, pipeline=want_pipeline,
                                                notes=notes))
        _write_folder(out, dst_uri, storage_cfg)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"folder": dst_uri, "kind": "DiTPipeline" if want_pipeline else "DiTTransformer2DModel",
              "objective": objective, "model": description.model.get("name"), "model_step": description.step,
              "weights": source.uri, "num_classes": num_classes}
    if objective == "flow":
        result["message"] = DDPM_MESSAGE
    return result


# --- import: diffusers -> ours -------------------------------------------------------------------


def is_diffusers_folder(uri: str, storage_cfg: Optional[StorageConfig] = None) -> bool:
    """A DiTPipeline folder (model_index.json) or a transformer folder (config.json with a DiT class)."""
    if not storage.is_dir(uri, storage_cfg):
        return False
    return (storage.exists(storage.join(uri, MODEL_INDEX_FILE), storage_cfg)
            or storage.exists(storage.join(uri, CONFIG_FILE), storage_cfg))


def _read_safetensors_folder(folder: Path, key: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    elif (folder / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (it has {', '.join(pickles)}: pickles, which can run code when loaded; re-save with "
                "save_pretrained(folder, safe_serialization=True))") if pickles else ""
        raise InteropError(f"{key}: '{folder}' has no {WEIGHTS_FILE}{hint}")
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def _preset_for(depth: int, hidden: int, heads: int, patch: int) -> Tuple[str, Dict[str, Any]]:
    """The preset name (and overrides) of a DiT geometry: an exact preset when one exists."""
    candidates = [n for n, p in DIT_PRESETS.items() if n.startswith("DiT-") and p["patch_size"] == patch]
    for name in candidates:
        preset = DIT_PRESETS[name]
        if (preset["depth"], preset["hidden_size"], preset["num_heads"]) == (depth, hidden, heads):
            return name, {}
    if not candidates:
        raise InteropError(f"patch size {patch}: no DiT preset has it (presets: {', '.join(DIT_PRESETS)})")
    return candidates[0], dict(depth=depth, hidden_size=hidden, num_heads=heads)


def _schedule_from(scheduler: Dict[str, Any], key: str) -> Tuple[str, int]:
    from speed.diffusion.gaussian import get_beta_schedule

    steps = int(scheduler.get("num_train_timesteps", 1000))
    kind = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is None and kind == "squaredcos_cap_v2":
        return "cosine", steps
    if scheduler.get("trained_betas") is None and kind == "linear":
        betas = get_beta_schedule("linear", steps)
        if (abs(float(scheduler.get("beta_start", 1e-4)) - betas[0]) < 1e-9
                and abs(float(scheduler.get("beta_end", 0.02)) - betas[-1]) < 1e-9):
            return "linear", steps
    raise InteropError(f"{key}: its scheduler ({kind}, {steps} steps) is not one of the trainer's schedules (linear "
                       "1e-4..0.02 rescaled to the step count, or squaredcos_cap_v2)")


def import_from_diffusers(src_uri: str, dst_uri: str, *, storage_cfg: Optional[StorageConfig] = None,
                          key: str = "SRC") -> Dict[str, Any]:
    """Turn a diffusers ``DiTTransformer2DModel`` folder (or a ``DiTPipeline`` folder) into an
    export here (``ema.safetensors`` + ``model.json``). A folder this module wrote comes back
    bit-exact, with its description; another is described from its configs (latents when it has
    4 input channels, DiT's linear 1000-step schedule unless a scheduler config says otherwise)."""
    _check_dst(dst_uri, storage_cfg, key="DST")
    workdir = tempfile.mkdtemp(prefix="speed-diffusers-")
    try:
        root = Path(storage.local_copy(src_uri, workdir, storage_cfg))
        if not root.is_dir():
            raise InteropError(f"{key}: '{src_uri}' is not a folder")
        pipeline_index = root / MODEL_INDEX_FILE
        folder, scheduler_file, vae_config = root, root / SCHEDULER_FILE, None
        if pipeline_index.is_file():
            folder = root / TRANSFORMER_DIR
            scheduler_file = root / "scheduler" / SCHEDULER_FILE
            vae_config = root / "vae" / CONFIG_FILE
        if not (folder / CONFIG_FILE).is_file():
            raise InteropError(f"{key}: '{src_uri}' is neither a DiTPipeline folder ({MODEL_INDEX_FILE} + "
                               f"{TRANSFORMER_DIR}/) nor a DiTTransformer2DModel folder ({CONFIG_FILE})")
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("_class_name") not in TRANSFORMER_CLASSES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise InteropError(f"{key}: '{src_uri}' holds a {config.get('_class_name')} "
                               f"(norm_type {config.get('norm_type')}), not a DiTTransformer2DModel")
        eps = float(config.get("norm_eps", 1e-5))
        if abs(eps - DIT_NORM_EPS) > 1e-12:
            log.warning("%s: norm_eps=%g in diffusers, %g in our DiT; the imported model differs slightly", key, eps,
                        DIT_NORM_EPS)
        tensors = _read_safetensors_folder(folder, key)
        speed_meta = json.loads((folder / SPEED_FILE).read_text()) if (folder / SPEED_FILE).is_file() else None
        if speed_meta is not None:
            description = ModelDescription.from_dict(speed_meta["description"])
            num_classes, has_null = int(speed_meta["num_classes"]), bool(speed_meta["has_null_class"])
        else:
            description, num_classes, has_null = _describe_foreign(config, scheduler_file, vae_config, key)
        ours = from_diffusers_state_dict(tensors, num_classes, has_null)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    model = description.build()
    ours["pos_embed"] = model.state_dict()["pos_embed"].clone()
    from speed.models.export import load_state_dict_checked

    load_state_dict_checked(model, ours, source=src_uri, key=key)
    weights_uri = save_export(ours, description, dst_uri, storage_cfg)
    return {"export": weights_uri, "folder": dst_uri, "model": description.model.get("name"),
            "model_step": description.step, "objective": objective_of(description), "num_classes": num_classes,
            "described_from": SPEED_FILE if speed_meta is not None else "the diffusers configs"}


def _describe_foreign(config: Dict[str, Any], scheduler_file: Path, vae_config: Optional[Path],
                      key: str) -> Tuple[ModelDescription, int, bool]:
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise InteropError(f"{key}: out_channels={out_channels} is neither in_channels ({in_channels}) nor twice it")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise InteropError(f"{key}: activation_fn={config.get('activation_fn')!r}; our DiT uses gelu-approximate")
    num_classes = int(config.get("num_embeds_ada_norm") or 1000)
    name, overrides = _preset_for(int(config["num_layers"]), heads * head_dim, heads, int(config.get("patch_size", 2)))
    model_cfg = ModelConfig(name=name, num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels,
                            class_dropout_prob=0.1, **overrides)
    schedule, steps = ("linear", 1000)
    if scheduler_file.is_file():
        schedule, steps = _schedule_from(json.loads(scheduler_file.read_text()), key)
    sample_size = int(config.get("sample_size", 32))
    latent = in_channels == 4
    latent_scale = 0.18215
    if vae_config is not None and vae_config.is_file():
        latent_scale = float(json.loads(vae_config.read_text()).get("scaling_factor", latent_scale))
    description = ModelDescription(
        model=dataclasses.asdict(model_cfg), input_size=sample_size, in_channels=in_channels,
        data_format="latents" if latent else "imagefolder", resolution=sample_size * 8 if latent else sample_size,
        latent_scale=latent_scale, num_timesteps=steps, schedule=schedule, step=0,
    )
    return description, num_classes, True


__all__ = [
    "InteropError",
    "PixelSpaceDecoder",
    "check_exportable",
    "ddpm_scheduler",
    "ddpm_scheduler_config",
    "diffusers_config",
    "export_to_diffusers",
    "from_diffusers_state_dict",
    "import_from_diffusers",
    "imagenet_id2label",
    "is_diffusers_folder",
    "model_card",
    "to_diffusers_state_dict",
    "to_diffusers_transformer",
    "use_dit_timestep_frequencies",
]
