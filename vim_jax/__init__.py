"""vim-jax: Vision Mamba and ViG in JAX/Flax NNX.

The model and the mixers import without TensorFlow or ml_collections (the data pipeline is
imported by the training code only).
"""

from vim_jax.mixers.gla import gla
from vim_jax.mixers.selective_scan import selective_scan
from vim_jax.models.vim import VisionMamba
from vim_jax.weights.create import create_model, list_models

__all__ = ["VisionMamba", "create_model", "list_models", "gla", "load_exported", "selective_scan"]


def __getattr__(name):
    # Imported on first use: importing vim_jax.export here would make
    # ``python -m vim_jax.export`` import it twice (runpy warns).
    if name == "load_exported":
        from vim_jax.export import load_exported

        return load_exported
    raise AttributeError(f"module 'vim_jax' has no attribute {name!r}")
