"""``create_model``: an architecture by name (``vim_jax.models.registry``) with weights from
anywhere this package reads (``vim_jax.weights.formats``, ``vim_jax.weights.hub``), and
``list_models``."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Optional

from flax import nnx

from vim_jax.models import registry
from vim_jax.models.vim import split_pos_embed
from vim_jax.weights import formats
from vim_jax.weights.hub import WEIGHTS, weights_path
from vim_jax.weights.names import infer_model_kwargs, infer_vig_kwargs

_FALSE = (None, False, "", "False", "false")


def list_models(pretrained: bool = False) -> list[str]:
    """Names of the registered variants (short names; official long names are aliases);
    with ``pretrained=True`` only those with official weights (``create_model(name,
    pretrained=True)``)."""
    if pretrained:
        return sorted(n for n in registry.VARIANTS if n in WEIGHTS)
    return registry.known_names()


def infer_name(state_dict) -> Optional[str]:
    """The registered variant an official state dict is most likely of, or None when its keys
    are no family's: the family from its keys, then that family's variant of its width, and
    of those the one whose block counts and patch grid are nearest (the smaller on a tie;
    Vim's stride-8 "+" models by their 27x27 grid at 224 px). Block counts, classes and grid
    are then read off the weights as for a named model, so a shallower or re-gridded
    checkpoint still loads."""
    sd = state_dict
    if "layers.0.mixer.A_log" in sd and "patch_embed.proj.weight" in sd:
        family, width, inferred = "vim", sd["patch_embed.proj.weight"].shape[0], infer_model_kwargs(sd)
    elif "patch_embed.5.weight" in sd and any(k.startswith("layers.0.blocks.") for k in sd):
        family, width, inferred = "vig_h", sd["patch_embed.5.weight"].shape[0], infer_vig_kwargs(sd, "vig_h")
    elif "pos_embed" in sd and any(k.startswith("blocks.0.attn.") for k in sd):
        family, width, inferred = "vig", sd["pos_embed"].shape[-1], infer_vig_kwargs(sd, "vig")
    else:
        return None

    def distance(name):
        v = registry.VARIANTS[name]
        if family == "vig_h":
            depths = inferred.get("depths", v["depths"])
            return sum(abs(a - b) for a, b in zip(v["depths"], depths)), sum(v["depths"]), name
        grid = (((v["img_size"] - v["patch_size"]) // v["stride"] + 1) ** 2 if family == "vim"
                else (v["img_size"] // 16) ** 2)
        return grid != inferred.get("num_patches"), v["img_size"] != 224, v.get("stride", 16) != 16, name

    candidates = [n for n, v in registry.VARIANTS.items()
                  if registry.family_of(n) == family and v.get("dims", v.get("embed_dim")) == width]
    return min(candidates, key=distance) if candidates else None


def create_model(name: Optional[str] = None, *, pretrained: str | bool | None = None, seed: int = 0,
                 step: Optional[int] = None, ema: bool = False, **overrides):
    """Builds a model (``VisionMamba``, ``ViG``, ``HierViG`` or a segmenter), optionally
    loading weights. Returned in eval mode.

    Args:
      name: a variant from ``list_models()`` or an official long name. May be None when
        ``pretrained`` names it: a checkpoint or safetensors directory of this project (its
        saved name), or an official state dict (``infer_name``: family, width and depth read
        off its keys).
      pretrained: True (or "True") for the official weights of ``name`` from the Hugging
        Face Hub (``list_models(pretrained=True)``); or a path: an official ``.pth``
        (``{"model": state_dict}``), an ``.npz`` state dict with the official keys, a
        ``.safetensors`` file (official or this project's names), a checkpoint directory of
        this project (a training workdir or the output of ``python -m vim_jax.convert``),
        a directory of ``model.safetensors`` and ``config.json`` (``convert --to
        safetensors``); or a trained segmenter's workdir (its parameters and BatchNorm
        statistics).
      seed: PRNG seed for the parameters that are not loaded (and drop path).
      step, ema: with a checkpoint directory, which step (default: the latest) and whether
        to take its EMA weights; ``ema`` with a ``.pth`` training checkpoint: its ``model_ema``.
      **overrides: the model class's arguments (Vim: depth, scan_backend, ...; ViG: depth,
        gla_backend; ViG-H: depths; all: num_classes, img_size, drop_path_rate, dtype, ...);
        they win over the variant and the checkpoint. Block counts, num_classes and the
        patch grid are read off a checkpoint when not given.
    """
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained) \
            and formats.saved_name(pretrained) in registry.SEG_VARIANTS:  # a trained segmenter
        saved = json.loads((pathlib.Path(pretrained) / formats.MODEL_FILE).read_text())
        saved_as = saved.pop("name")
        if name not in (None, saved_as):
            raise ValueError(f"{pretrained} holds a {saved_as!r}, not a {name!r}: pass "
                             f"name={saved_as!r} or None")
        model = registry.build(saved_as, seed=seed, **{**saved, **overrides})
        formats.restore_into(model, pretrained, step=step, ema=ema)
        return model
    if name in registry.SEG_VARIANTS:
        return _create_segmenter(name, pretrained=pretrained, seed=seed, **overrides)
    saved, state_dict, params = {}, None, None
    if pretrained is True or pretrained in ("True", "true"):
        if name is None:
            raise ValueError("pretrained=True needs a model name; see list_models(pretrained=True)")
        pretrained = weights_path(registry.resolve_name(name))
    if pretrained in _FALSE:
        pretrained = None
    if pretrained is not None:
        saved, state_dict, params = formats.read_weights(pretrained, step=step, ema=ema)
        saved_as = saved.pop("name", None)
        if name is not None and saved_as is not None and registry.resolve_name(name) != saved_as:
            raise ValueError(f"{pretrained} holds a {saved_as!r}, not a {name!r}: pass "
                             f"name={saved_as!r} or None")
        name = name or saved_as or (infer_name(state_dict) if state_dict is not None else None)
        if name is None:
            raise ValueError(f"{pretrained} holds weights of no model this package knows by their "
                             f"keys; pass the model's name (one of list_models())")
    if name is None:
        raise ValueError("create_model needs a model name (or pretrained weights that name it)")
    name = registry.resolve_name(name)
    family, variant = registry.family_of(name), registry.VARIANTS[name]
    kwargs, ckpt_img = dict(saved), None
    if state_dict is not None:
        inferred = (infer_model_kwargs(state_dict, variant["cls_position"]) if family == "vim"
                    else infer_vig_kwargs(state_dict, family))
        num_patches = inferred.pop("num_patches", None)
        if num_patches is not None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"{pretrained}: pos_embed holds {num_patches} patch positions, "
                                 "not a square grid")
            # The image size whose patch grid the checkpoint's position embedding is for.
            ckpt_img = ((side - 1) * variant["stride"] + variant["patch_size"] if family == "vim"
                        else 16 * side)
            inferred["img_size"] = ckpt_img
        kwargs.update(inferred)
    model = registry.build(name, seed=seed, **{**kwargs, **overrides})
    if state_dict is not None:
        formats.load_state_dict_into(model, state_dict, ckpt_img_size=ckpt_img, source=pretrained)
    elif params is not None:
        formats.load_params_into(model, params, saved_img_size=saved.get("img_size"), source=pretrained)
    return model


def _create_segmenter(name: str, *, pretrained=None, seed: int = 0, **overrides):
    """A segmenter of ``registry.SEG_VARIANTS`` in eval mode; ``pretrained`` is a
    classification checkpoint (any form ``create_model`` takes) loaded into the backbone as
    the official code does: the head dropped; for Vim the class token and its position entry
    dropped and the position embedding resized to the crop size; for ViG-H the classifier's
    norm dropped. Neck, out norms and heads freshly initialised."""
    spec, family = registry.SEG_VARIANTS[name], registry.segmenter_family(name)
    backbone_args, kwargs, source = registry.SEG_BACKBONE_ARGS[family], {}, None
    if pretrained not in _FALSE:
        img = overrides.get("img_size", registry.segmenter_defaults(name)["img_size"])
        source = create_model(spec["backbone"] if not os.path.isdir(str(pretrained)) else None,
                              pretrained=pretrained, img_size=img, seed=seed)
        if registry.family_of(source.config["name"]) != family:
            raise ValueError(f"{pretrained} holds a {source.config['name']!r}, whose architecture "
                             f"is not {name}'s backbone ({spec['backbone']!r} family)")
        kwargs = {k: source.config[k] for k in backbone_args}
    model = registry.build(name, seed=seed, **{**kwargs, **overrides})
    if source is not None:
        body = nnx.to_pure_dict(nnx.state(source, nnx.Param))
        body.pop("head", None)
        if family == "vim":
            body.pop("cls_token", None)
            n = source.grid[0] * source.grid[1]
            body["pos_embed"] = split_pos_embed(body["pos_embed"], source.cls_position, n)[0]
        else:  # the dense backbone's out norms replace the classifier's norm
            body.pop("norm")
            body["outnorms"] = nnx.to_pure_dict(nnx.state(model.backbone.outnorms, nnx.Param))
        formats.load_params_into(model.backbone, body, source=str(pretrained))
    return model
