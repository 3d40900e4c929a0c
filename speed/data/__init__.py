"""The data plane's pure parts (no Ray): the embedded digits dataset (``digits``), image
preprocessing (``transforms``), dataset scanning (``catalog``), per-batch decode transforms
(``batches``), the latents format (``latents``) and the VAE wrapper (``vae``).

``ray_jobs.data`` wires these into Ray Data pipelines; ``ray_jobs.prepare`` writes datasets.
Names are loaded on first use, so that the Ray Data decode workers, which import only
``transforms`` and ``batches``, never import torch.
"""

from importlib import import_module

_EXPORTS = {
    "DIGITS_NUM_CLASSES": "digits",
    "DIGITS_NUM_IMAGES": "digits",
    "digits_batch_indices": "digits",
    "load_digits": "digits",
    "load_builtin": "builtin",
    "load_patches": "patches",
    "write_patches": "patches",
    "sample_latents": "latents",
    "center_crop_arr": "transforms",
    "decode_image": "transforms",
    "flip_mask": "transforms",
    "to_model_tensor": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"speed.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'speed.data' has no attribute {name!r}")
