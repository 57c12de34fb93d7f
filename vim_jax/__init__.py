"""vim-jax: Vision Mamba in JAX/Flax NNX.

The model and selective scan import without TensorFlow or ml_collections (the data
pipeline is imported lazily by the training code).
"""

from vim_jax.models import VisionMamba, create_model, list_models
from vim_jax.mixers.gla import gla
from vim_jax.mixers.selective_scan import selective_scan

__all__ = ["VisionMamba", "create_model", "list_models", "gla", "load_exported", "selective_scan"]


def __getattr__(name):
    # Imported on first use: importing vim_jax.export here would make
    # ``python -m vim_jax.export`` import it twice (runpy warns).
    if name == "load_exported":
        from vim_jax.export import load_exported

        return load_exported
    raise AttributeError(f"module 'vim_jax' has no attribute {name!r}")
