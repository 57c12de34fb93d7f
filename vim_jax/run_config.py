"""A training run's config: reading it from a workdir, and the model it describes.

Shared by training and evaluation (``vim_jax.trainer``, ``vim_jax.evaluation``).
"""

from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from vim_jax.models.registry import create_model
from vim_jax.models.vim import REMAT
from vim_jax.mixers.selective_scan import BACKENDS

CONFIG_FILE = "config.json"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to change."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise TrainingError(f"{workdir} has no {CONFIG_FILE}: not a training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# Config values with a fixed set of choices: a near miss such as "bf16" fails by name.
CHOICES = {"model.dtype": ("float32", "bfloat16"), "model.scan_backend": BACKENDS,
           "model.remat": REMAT}


def check_choices(config) -> None:
    """Raises TrainingError naming a ``CHOICES`` value that is not allowed, and the allowed."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = config[section].get(name)
        if value is not None and value not in allowed:
            raise TrainingError(f"{key}={value!r} is not one of {allowed}")


def build_model(config, num_classes: int):
    """The model a config describes (loading ``model.pretrained`` if set), in eval mode.
    With ``model.reset_head`` the checkpoint's head is dropped and a new one initialised,
    for fine-tuning on a dataset with other classes."""
    check_choices(config)
    m = config.model
    kwargs = dict(img_size=config.data.image_size, drop_path_rate=m.drop_path_rate, dtype=m.dtype,
                  **m.overrides.to_dict())
    # Vim's scan backend (None in ViG configs, whose GLA backend is an override); remat: what
    # each block keeps for the backward pass (Vim: mixer, full, none; ViG: full, none).
    kwargs.update({k: m.get(k) for k in ("scan_backend", "remat") if m.get(k) is not None})
    if not (m.reset_head and m.pretrained):
        return create_model(m.name, pretrained=m.pretrained or None, seed=config.seed,
                            num_classes=num_classes, **kwargs)
    source = create_model(m.name, pretrained=m.pretrained, seed=config.seed, **kwargs)
    blocks = {k: source.config[k] for k in ("depth", "depths") if k in source.config}
    model = create_model(m.name, seed=config.seed, num_classes=num_classes, **{**blocks, **kwargs})
    body = nnx.state(source, nnx.Param)
    body.pop("head")
    nnx.update(model, body)
    return model
