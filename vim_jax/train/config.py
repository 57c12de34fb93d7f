"""A training run's config: reading it from a workdir, and the model it describes.

Shared by training and evaluation (``vim_jax.train.loop``, ``vim_jax.train.evaluation``).
"""

from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from vim_jax.mixers import gla, selective_scan
from vim_jax.models import registry
from vim_jax.models.vim import REMAT
from vim_jax.weights.create import create_model

CONFIG_FILE = "config.json"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to change."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise TrainingError(f"{workdir} has no {CONFIG_FILE}: not a training workdir")
    with open(path) as f:
        body = json.load(f)
    model = body.get("model", {})
    if "scan_backend" in model:  # written before model.mixer_backend named both families' choice
        model.setdefault("mixer_backend", model.pop("scan_backend") or "auto")
    return ml_collections.ConfigDict(body)


# Config values with a fixed set of choices: a near miss such as "bf16" fails by name.
CHOICES = {"model.dtype": ("float32", "bfloat16"), "model.remat": REMAT}
# model.mixer_backend is the sequence mixer's backend, the model argument of its family.
MIXER_ARGS = {"scan_backend": selective_scan.BACKENDS, "gla_backend": gla.BACKENDS}


def mixer_arg(name: str) -> str:
    """The argument of model ``name`` that ``model.mixer_backend`` sets: Vim's
    ``scan_backend``, ViG's ``gla_backend``."""
    return next(a for a in MIXER_ARGS if a in registry.model_args(registry.model_class(name)))


def check_choices(config) -> None:
    """Raises TrainingError naming a value of ``CHOICES`` or ``model.mixer_backend`` that is
    not allowed, and the allowed ones."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = config[section].get(name)
        if value is not None and value not in allowed:
            raise TrainingError(f"{key}={value!r} is not one of {allowed}")
    backend, name = config.model.get("mixer_backend"), config.model.get("name")
    if backend is not None and name:
        try:
            arg = mixer_arg(name)
        except ValueError as e:  # an unknown model name
            raise TrainingError(f"model.name: {e}") from None
        if backend not in MIXER_ARGS[arg]:
            raise TrainingError(f"model.mixer_backend={backend!r} is not one of {MIXER_ARGS[arg]} "
                                f"(the {arg} of {name})")


def build_model(config, num_classes: int):
    """The model a config describes (loading ``model.pretrained`` if set), in eval mode.
    With ``model.reset_head`` the checkpoint's head is dropped and a new one initialised,
    for fine-tuning on a dataset with other classes."""
    check_choices(config)
    m = config.model
    kwargs = dict(img_size=config.data.image_size, drop_path_rate=m.drop_path_rate, dtype=m.dtype,
                  **m.overrides.to_dict())
    # The mixer's backend under its family's name; remat: what each block keeps for the
    # backward pass (every family: mixer, full, none).
    if m.get("mixer_backend") is not None and m.name:
        kwargs[mixer_arg(m.name)] = m.mixer_backend
    if m.get("remat") is not None:
        kwargs["remat"] = m.remat
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
