"""Model definitions and the named-variant registry."""

from vim_jax.models.registry import create_model, list_models, resolve_name
from vim_jax.models.vim import VisionMamba

__all__ = ["VisionMamba", "create_model", "list_models", "resolve_name"]
