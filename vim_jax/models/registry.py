"""Named variants of both families (mirroring the official registries) and ``create_model``:
Vim, plain ViG and hierarchical ViG-H classifiers, and the segmenters."""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from vim_jax import pretrained as io
from vim_jax.state_dict import infer_model_kwargs, infer_vig_kwargs
from vim_jax.models.vig import ViG
from vim_jax.models.vig_h import HierViG
from vim_jax.models.vim import VisionMamba

_WIDTHS = {"tiny": 192, "small": 384, "base": 768}

VARIANTS: dict[str, dict] = {}
for _size, _dim in _WIDTHS.items():
    for _stride in (16, 8):
        if _size == "base" and _stride == 8:
            continue  # no official base "+" model
        for _img in (224, 384):
            _name = f"vim_{_size}_patch16{'_stride8' if _stride == 8 else ''}_{_img}"
            VARIANTS[_name] = dict(img_size=_img, patch_size=16, stride=_stride, embed_dim=_dim,
                                   depth=24, d_state=16, expand=2, cls_position="middle")

# ViG (hustvl/ViG configs/vig/*.yaml): the SiLU switches are ViG-T's alone and live in the
# config, not in the weights.
for _size, (_dim, _heads, _act) in {"tiny": (192, 3, True), "small": (384, 6, False),
                                    "base": (768, 12, False)}.items():
    VARIANTS[f"vig_{_size}_patch16_224"] = dict(img_size=224, embed_dim=_dim, depth=12, num_heads=_heads,
                                                act_in_conv=_act, out_act=_act)
# ViG-H (configs/vig-h/*.yaml).
for _size, (_dims, _depths, _heads) in {"tiny": (96, (2, 2, 5, 2), (3, 6, 12, 24)),
                                        "small": (96, (2, 2, 17, 2), (3, 6, 12, 24)),
                                        "base": (128, (2, 2, 17, 2), (4, 8, 16, 32))}.items():
    VARIANTS[f"vig_h_{_size}_224"] = dict(img_size=224, dims=_dims, depths=_depths, num_heads=_heads)

CLASSES = {"vim": VisionMamba, "vig": ViG, "vig_h": HierViG}


def family_of(name: str) -> str:
    """"vim", "vig" or "vig_h": the architecture (and state-dict layout) of variant ``name``."""
    return "vig_h" if name.startswith("vig_h_") else "vig" if name.startswith("vig_") else "vim"


def model_class(name: str):
    """The model class of variant ``name`` (short or official long name)."""
    return CLASSES[family_of(resolve_name(name))]

# The official builder names (models_mamba.py), accepted as aliases.
_SUFFIX = "bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
ALIASES = {
    f"vim_tiny_patch16_224_{_SUFFIX}": "vim_tiny_patch16_224",
    f"vim_tiny_patch16_stride8_224_{_SUFFIX}": "vim_tiny_patch16_stride8_224",
    f"vim_small_patch16_224_{_SUFFIX}": "vim_small_patch16_224",
    f"vim_small_patch16_stride8_224_{_SUFFIX}": "vim_small_patch16_stride8_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
        "vim_base_patch16_224",
}

def _model_args(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs")]

# Segmenters, FCN auxiliary head 256 channels, 512 crops. Vim (official seg/configs/vim/
# upernet): UperNet channels = the backbone width. (The official small segmenter adds rotary
# position embeddings to its backbone, which this port does not have: not registered.)
# ViG has no official segmenter: mmseg's UperNet for hierarchical backbones of its size
# (Swin-T), 512 channels.
SEG_VARIANTS: dict[str, dict] = {
    "upernet_vim_tiny": dict(backbone="vim_tiny_patch16_224", channels=192),
    "upernet_vig_h_tiny": dict(backbone="vig_h_tiny_224", channels=512),
}
# The segmenter arguments that describe its backbone, per backbone family: taken from the
# backbone's variant, or from the classification checkpoint loaded into it.
_SEG_BACKBONE_ARGS = {"vim": ("patch_size", "stride", "embed_dim", "depth"),
                      "vig_h": ("dims", "depths", "num_heads")}


def list_models(pretrained: bool = False) -> list[str]:
    """Names of the registered variants (short names; official long names are aliases);
    with ``pretrained=True`` only those with official weights (``create_model(name,
    pretrained=True)``)."""
    from vim_jax.hub import WEIGHTS

    if pretrained:
        return sorted(n for n in VARIANTS if n in WEIGHTS)
    return sorted(VARIANTS) + sorted(SEG_VARIANTS)


def resolve_name(name: str) -> str:
    """Short variant name for a short or official long name; ValueError names the choices."""
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())} "
                         f"(and the official long names {', '.join(sorted(ALIASES))})")
    return name


def create_model(name: Optional[str] = None, *, pretrained: str | bool | None = None, seed: int = 0,
                 step: Optional[int] = None, ema: bool = False, **overrides):
    """Builds a model (``VisionMamba``, ``ViG``, ``HierViG`` or a segmenter), optionally
    loading weights. Returned in eval mode.

    Args:
      name: a variant from ``list_models()`` or an official long name. May be None when
        ``pretrained`` is a checkpoint directory of this project (its saved name is used).
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
            and io.saved_name(pretrained) in SEG_VARIANTS:  # a trained segmenter
        saved = json.loads((pathlib.Path(pretrained) / io.MODEL_FILE).read_text())
        saved_as = saved.pop("name")
        if name not in (None, saved_as):
            raise ValueError(f"{pretrained} holds a {saved_as!r}, not a {name!r}: pass "
                             f"name={saved_as!r} or None")
        model = _create_segmenter(saved_as, seed=seed, **{**saved, **overrides})
        io.restore_into(model, pretrained, step=step, ema=ema)
        return model
    if name in SEG_VARIANTS:
        return _create_segmenter(name, pretrained=pretrained, seed=seed, **overrides)
    saved, state_dict, params = {}, None, None
    if pretrained is True or pretrained in ("True", "true"):
        if name is None:
            raise ValueError("pretrained=True needs a model name; see list_models(pretrained=True)")
        from vim_jax.hub import weights_path

        pretrained = weights_path(resolve_name(name))
    if pretrained is False or pretrained in ("", "False", "false"):
        pretrained = None
    if pretrained is not None:
        hf_dir = os.path.isdir(pretrained) and io.is_hf_dir(pretrained) \
            and not os.path.exists(os.path.join(pretrained, io.MODEL_FILE))
        if os.path.isdir(pretrained) and not hf_dir:
            saved, params, _ = io.load_dir(pretrained, model_class, step=step, ema=ema)
        elif step is not None:
            raise ValueError(f"step= applies to checkpoint directories (training workdirs); "
                             f"{pretrained} holds one set of weights")
        elif hf_dir or str(pretrained).endswith(".safetensors"):
            if ema:
                raise ValueError(f"ema=True applies to training workdirs and .pth training "
                                 f"checkpoints; {pretrained} holds one set of weights")
            names, tensors, saved = io.read_safetensors(
                os.path.join(pretrained, io.HF_WEIGHTS) if hf_dir else pretrained)
            saved = io.read_hf_config(pretrained) if hf_dir else saved
            state_dict, params = (tensors, None) if names == "official" else (None, tensors)
        else:
            state_dict = io.load_state_dict(pretrained, ema=ema)
        saved_as = saved.pop("name", None)
        if name is not None and saved_as is not None and resolve_name(name) != saved_as:
            raise ValueError(f"{pretrained} holds a {saved_as!r}, not a {name!r}: pass "
                             f"name={saved_as!r} or None")
        name = name or saved_as
    if name is None:
        raise ValueError("create_model needs a model name (or a pretrained checkpoint directory)")
    name = resolve_name(name)
    family, cls = family_of(name), model_class(name)
    bad = sorted(set(overrides) - set(_model_args(cls)))
    if bad:
        near = {b: difflib.get_close_matches(b, _model_args(cls), n=1) for b in bad}
        hint = "".join(f" (did you mean {m[0]!r} for {b!r}?)" for b, m in near.items() if m)
        raise TypeError(f"unknown argument(s) {bad} for {name}{hint}; allowed: {_model_args(cls)}")
    kwargs = {**VARIANTS[name], **saved}
    ckpt_img = None
    if state_dict is not None:
        inferred = (infer_model_kwargs(state_dict, kwargs["cls_position"]) if family == "vim"
                    else infer_vig_kwargs(state_dict, family))
        num_patches = inferred.pop("num_patches", None)
        if num_patches is not None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"{pretrained}: pos_embed holds {num_patches} patch positions, "
                                 "not a square grid")
            # The image size whose patch grid the checkpoint's position embedding is for.
            ckpt_img = ((side - 1) * kwargs["stride"] + kwargs["patch_size"] if family == "vim"
                        else 16 * side)
            inferred["img_size"] = ckpt_img
        kwargs.update(inferred)
    kwargs.update(overrides)
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype") or "float32")
    model = _build(cls, kwargs, seed)
    model.config = {"name": name, **{k: (v.name if k == "dtype" else v) for k, v in kwargs.items()}}
    if state_dict is not None:
        io.load_state_dict_into(model, state_dict, ckpt_img_size=ckpt_img, source=pretrained)
    elif params is not None:
        io.load_params_into(model, params, saved_img_size=saved.get("img_size"), source=pretrained)
    return model


def _build(cls, kwargs: dict, seed: int):
    """``cls(**kwargs)`` with parameters drawn from ``seed``, initialised as one compiled
    program (hundreds of eager ops are ~2x slower). XLA's backend optimisations are off for
    it: the program runs once, and they made compiling it 5x longer (a four-stage ViG-H on a
    2-core CPU: 13 s against 2.6 s; running it: 10 ms against 26 ms)."""
    graphdef = []  # the module's structure, kept while the initialiser is traced

    def init():
        g, state = nnx.split(cls(**kwargs, rngs=nnx.Rngs(seed)))
        graphdef.append(g)
        return state

    # Compiler options are for top-level jits only; under a trace (nnx.eval_shape of
    # create_model), where a constant is a tracer, nothing is compiled anyway.
    traced = isinstance(jnp.zeros(()), jax.core.Tracer)
    options = None if traced else {"xla_backend_optimization_level": 0}
    state = jax.jit(init, compiler_options=options)()
    return nnx.merge(graphdef[0], state)


def _create_segmenter(name: str, *, pretrained=None, seed: int = 0, **overrides):
    """A ``VimUperNet`` or ``ViGHUperNet`` (``SEG_VARIANTS``) in eval mode; ``pretrained`` is a
    classification checkpoint (any form ``create_model`` takes) loaded into the backbone as
    the official code does: the head dropped; for Vim the class token and its position entry
    dropped and the position embedding resized to the crop size; for ViG-H the classifier's
    norm dropped. Neck, out norms and heads freshly initialised."""
    from vim_jax.models.seg import ViGHUperNet, VimUperNet
    from vim_jax.models.vim import split_pos_embed

    spec = SEG_VARIANTS[name]
    family = family_of(spec["backbone"])
    cls, backbone_args = {"vim": VimUperNet, "vig_h": ViGHUperNet}[family], _SEG_BACKBONE_ARGS[family]
    bb = VARIANTS[spec["backbone"]]
    kwargs = dict(num_classes=150, img_size=512, channels=spec["channels"],
                  **{k: bb[k] for k in backbone_args})
    allowed = set(_model_args(cls))
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise TypeError(f"unknown argument(s) {bad} for {name}; allowed: {sorted(allowed)}")
    source = None
    if pretrained not in (None, False, "", "False", "false"):
        img = overrides.get("img_size", kwargs["img_size"])
        source = create_model(spec["backbone"] if not os.path.isdir(str(pretrained)) else None,
                              pretrained=pretrained, img_size=img, seed=seed)
        if family_of(source.config["name"]) != family:
            raise ValueError(f"{pretrained} holds a {source.config['name']!r}, whose architecture "
                             f"is not {name}'s backbone ({spec['backbone']!r} family)")
        kwargs.update({k: source.config[k] for k in backbone_args})
    kwargs.update(overrides)
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype") or "float32")
    model = _build(cls, kwargs, seed)
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
        io.load_params_into(model.backbone, body, source=str(pretrained))
    model.config = {"name": name, **{k: (v.name if k == "dtype" else v) for k, v in kwargs.items()}}
    return model
