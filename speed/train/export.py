"""Moved: exports live in ``speed.models.export``, the description and builder in
``speed.models.registry``; importable from here as before."""

from speed.models.export import (  # noqa: F401
    DESCRIPTION_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    WeightsError,
    load_export,
    load_state_dict_checked,
    read_weights,
    save_export,
)
from speed.models.registry import ModelDescription, build_model, describe, model_geometry  # noqa: F401
