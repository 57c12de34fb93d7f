"""Checkpoint files: official state dicts (.pth/.npz/.safetensors) and this project's
checkpoint directories.

One directory format for trained and converted models alike, a training workdir's:
``model.json`` (the variant name and every model argument) and
``checkpoints/<step>/{params, ema[, opt_state]}`` (orbax, ``vim_jax.weights.checkpoints``).
``python -m vim_jax.convert`` writes step 0 with ``ema`` equal to ``params``.

For publishing and exchanging weights: safetensors, under the official PyTorch names (the
same file loads into the official model) or this project's parameter names, and a
Hugging Face-style directory of ``model.safetensors`` with ``config.json`` beside it
(``{"architecture": name, "num_classes": n, "model_args": {...}}``, timm's layout).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx, traverse_util

from vim_jax.models import vig as vig_model
from vim_jax.models.registry import model_class
from vim_jax.models.vim import resize_pos_embed
from vim_jax.weights import pth
from vim_jax.weights.files import atomic_write
from vim_jax.weights.names import (CheckpointMismatch, VIG_FAMILIES, mismatch_report,
                                params_to_state_dict, state_dict_to_params, vig_params_to_state_dict,
                                vig_state_dict_to_params)

MODEL_FILE = "model.json"
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
NAMES = ("official", "vim_jax")
# safetensors metadata: which names a file uses, and the model's config (JSON).
_NAMES_KEY, _CONFIG_KEY = "vim_jax.names", "vim_jax.config"


def read_weights(path, *, step=None, ema: bool = False) -> tuple[dict, dict | None, dict | None]:
    """Weights in any form ``create_model`` takes -> (saved model config, possibly with
    "name"; an official state dict or None; this project's nested parameters or None): a
    checkpoint directory, a ``save_hf_dir`` directory, a ``.safetensors`` file of either
    naming, or an official ``.pth``/``.npz``."""
    hf_dir = os.path.isdir(path) and is_hf_dir(path) and not os.path.exists(os.path.join(path, MODEL_FILE))
    if os.path.isdir(path) and not hf_dir:
        saved, params, _ = load_dir(path, step=step, ema=ema)
        return saved, None, params
    if step is not None:
        raise ValueError(f"step= applies to checkpoint directories (training workdirs); "
                         f"{path} holds one set of weights")
    if hf_dir or str(path).endswith(".safetensors"):
        if ema:
            raise ValueError(f"ema=True applies to training workdirs and .pth training "
                             f"checkpoints; {path} holds one set of weights")
        names, tensors, saved = read_safetensors(os.path.join(path, HF_WEIGHTS) if hf_dir else path)
        saved = read_hf_config(path) if hf_dir else saved
        return (saved, tensors, None) if names == "official" else (saved, None, tensors)
    return {}, load_state_dict(path, ema=ema), None


def load_state_dict(path, *, ema: bool = False) -> dict[str, np.ndarray]:
    """Reads an official state dict: ``.pth`` (a bare state dict, or a training checkpoint
    ``{"model": sd, "model_ema": sd, "optimizer": ..., "args": Namespace, ...}`` whose
    ``model``, or with ``ema`` its ``model_ema``, is taken), ``.npz`` or ``.safetensors``."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if ema and path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"ema=True picks the model_ema of a .pth training checkpoint or the EMA "
                         f"weights of a training workdir; {path} holds one set of weights")
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if path.suffix == ".safetensors":
        names, tensors, config = read_safetensors(path)
        if names == "official":
            return tensors
        raise ValueError(f"{path} holds this project's parameter names, not a state dict: "
                         "pass it to create_model(pretrained=...)")
    if path.suffix in (".pth", ".pt", ".bin"):
        obj = pth.load(path)  # no PyTorch needed; runs nothing from the file
        key = "model_ema" if ema else "model"
        if ema and not (isinstance(obj, dict) and key in obj):
            held = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path} has no model_ema entry (it holds {held}); drop ema=True")
        sd = obj.get(key, obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
        return {k: v.astype(np.float32) if pth.is_floating(v.dtype) else v
                for k, v in sd.items() if isinstance(v, np.ndarray)}
    raise ValueError(f"checkpoint {path}: unknown format {path.suffix!r}; expected .pth, .pt, "
                     ".bin, .npz, .safetensors or a checkpoint directory")


def _read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """A safetensors file -> (tensors as float32 where floating, its metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); was it written "
                         "completely?") from e
    return {k: v.astype(np.float32) if pth.is_floating(v.dtype) else v
            for k, v in tensors.items()}, meta


def read_safetensors(path) -> tuple[str, dict, dict]:
    """A safetensors file of either naming scheme -> (names, tensors, model config): names
    "official" (tensors: an official state dict) or "vim_jax" (tensors: the nested
    parameters); the config ``save_safetensors`` stored, or {} for files from elsewhere."""
    tensors, meta = _read_safetensors(path)
    config = json.loads(meta.get(_CONFIG_KEY, "{}"))
    if meta.get(_NAMES_KEY) == "vim_jax" or any(k.endswith(".kernel") for k in tensors):
        return "vim_jax", traverse_util.unflatten_dict(tensors, sep="."), config
    return "official", tensors, config


def save_safetensors(model, path, *, names: str = "official") -> pathlib.Path:
    """Writes ``model``'s parameters as a safetensors file under the official PyTorch names
    (loadable by the official code) or this project's (``names="vim_jax"``: dotted paths
    of the NNX state, stacked layers); the model's config goes in the file's metadata."""
    from safetensors.numpy import save_file

    if names not in NAMES:
        raise ValueError(f"names={names!r} is not one of {NAMES}")
    family = getattr(model, "family", None)
    if family is None:
        raise ValueError(f"safetensors files hold classifiers (Vim, ViG, ViG-H); this is a "
                         f"{type(model).__name__}: keep it as a checkpoint directory")
    pure = _str_keys(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    if names == "vim_jax":
        tensors = traverse_util.flatten_dict(pure, sep=".")
    elif family in VIG_FAMILIES:
        tensors = vig_params_to_state_dict(pure, family=family)
    else:
        tensors = params_to_state_dict(pure, cls_position=model.cls_position)
    metadata = {"format": "pt" if names == "official" else "flax", _NAMES_KEY: names,
                _CONFIG_KEY: json.dumps(getattr(model, "config", {}))}
    return atomic_write(path, lambda tmp: save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata))


def save_hf_dir(model, out_dir, *, names: str = "official") -> pathlib.Path:
    """Writes ``model`` as a Hugging Face-style directory: ``model.safetensors`` (official
    names unless ``names="vim_jax"``) and ``config.json``; ``create_model(pretrained=out_dir)``
    reads it back."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_CONFIG).unlink(missing_ok=True)  # written last: it marks a complete directory
    save_safetensors(model, out / HF_WEIGHTS, names=names)
    config = {k: v for k, v in model.config.items() if k != "name"}
    body = {"architecture": model.config["name"], "num_classes": config.get("num_classes"),
            "model_args": config}
    atomic_write(out / HF_CONFIG, lambda tmp: tmp.write_text(json.dumps(body, indent=2, sort_keys=True)))
    return out


def is_hf_dir(path) -> bool:
    """Whether ``path`` is a directory written by ``save_hf_dir`` (config.json and weights)."""
    path = pathlib.Path(path)
    return (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()


def read_hf_config(path) -> dict:
    """The model config (``"name"`` and the model arguments) of a ``save_hf_dir`` directory."""
    body = json.loads((pathlib.Path(path) / HF_CONFIG).read_text())
    if "architecture" not in body:
        raise ValueError(f"{pathlib.Path(path) / HF_CONFIG} names no \"architecture\" (the model "
                         "name); it was not written by python -m vim_jax.convert --to safetensors")
    return {"name": body["architecture"], **body.get("model_args", {})}


def _str_keys(tree):
    """A nested dict with every key a string (list indices of the NNX state become "0", ...)."""
    return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _pos_resizer(model, from_img_size):
    """pos_embed at the grid of ``from_img_size`` -> at ``model.grid``, as the family resizes
    it (None for a model without a position embedding)."""
    if not hasattr(model, "pos_embed"):
        return None
    old = (model.grid_len(from_img_size),) * 2 if from_img_size else model.grid
    if getattr(model, "family", None) == "vig":
        return lambda pos: vig_model.resize_pos_embed(pos, old, model.grid)
    return lambda pos: resize_pos_embed(pos, model.cls_position, old, model.grid)


def load_state_dict_into(model, state_dict, *, ckpt_img_size=None, source="checkpoint"):
    """Loads an official state dict into ``model`` (in place); resizes pos_embed if needed."""
    params = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(params)
    resize = _pos_resizer(model, ckpt_img_size)
    if getattr(model, "family", None) in VIG_FAMILIES:
        pure = vig_state_dict_to_params(state_dict, target, family=model.family,
                                        pos_embed_fn=resize, source=str(source))
    else:
        pure = state_dict_to_params(state_dict, target, cls_position=model.cls_position,
                                    pos_embed_fn=resize, source=str(source))
    nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, pure))
    nnx.update(model, params)


def load_params_into(model, pure: dict, *, saved_img_size=None, source=""):
    """Loads a nested param dict written by ``save_pretrained`` into ``model`` (in place)."""
    params = nnx.state(model, nnx.Param)
    target = _str_keys(nnx.to_pure_dict(params))
    pure = _str_keys(pure)
    resize = _pos_resizer(model, saved_img_size)
    if saved_img_size and resize is not None:
        pure = dict(pure, pos_embed=resize(pure["pos_embed"]))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(pure)}
    report = mismatch_report(source, want, got)
    if report:
        raise CheckpointMismatch(report)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)


def write_model_config(directory, model) -> None:
    """Writes ``model.config`` as ``directory/model.json`` (atomically)."""
    atomic_write(pathlib.Path(directory) / MODEL_FILE,
                 lambda tmp: tmp.write_text(json.dumps(model.config, indent=2, sort_keys=True)))


def save_pretrained(model, out_dir) -> pathlib.Path:
    """Writes ``model`` as a checkpoint directory (step 0); returns its path."""
    from vim_jax.weights.checkpoints import Checkpoints

    out = pathlib.Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(str(out))
    ckpt.save_params(0, nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
    ckpt.wait()
    write_model_config(out, model)  # last: its presence marks a complete directory
    return out


def saved_name(path) -> str | None:
    """The model name a checkpoint directory's model.json records (None without one)."""
    cfg_file = pathlib.Path(path) / MODEL_FILE
    return json.loads(cfg_file.read_text()).get("name") if cfg_file.exists() else None


def restore_into(model, path, *, step=None, ema: bool = False) -> int:
    """Loads a checkpoint directory's parameters (and BatchNorm statistics) into ``model``,
    built with the directory's model.json; returns the step."""
    from vim_jax.weights.checkpoints import Checkpoints

    s, params, stats = Checkpoints(str(path)).restore_params(
        nnx.state(model, nnx.Param), ema=ema, step=step, batch_stats=nnx.state(model, nnx.BatchStat))
    nnx.update(model, params, stats)
    return s


def load_dir(path, *, step=None, ema: bool = False) -> tuple[dict, dict, int]:
    """Reads a checkpoint directory or training workdir -> (model config incl. "name",
    nested param dict, step): the latest step unless ``step``, the EMA weights if ``ema``.
    The architecture is the one model.json names."""
    from vim_jax.weights.checkpoints import Checkpoints

    path = pathlib.Path(path).resolve()
    cfg_file = path / MODEL_FILE
    if not cfg_file.exists():
        old = " (it was written by an older vim-jax: convert the original checkpoint again)" \
            if (path / "vim_config.json").exists() else ""
        half = [f for f in (HF_WEIGHTS, HF_CONFIG) if (path / f).exists()]
        if half:
            old = (f" nor the {HF_WEIGHTS} and {HF_CONFIG} of a safetensors directory (it holds "
                   f"only {half[0]})")
        raise FileNotFoundError(f"{path} is not a vim-jax checkpoint directory: no {MODEL_FILE}, "
                                f"which training workdirs and python -m vim_jax.convert write{old}")
    config = json.loads(cfg_file.read_text())
    kwargs = {k: v for k, v in config.items() if k != "name"}
    kwargs["dtype"] = np.dtype(kwargs.get("dtype") or "float32")
    cls = model_class(config.get("name"))
    abstract = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    s, params = Checkpoints(str(path)).restore_params(nnx.state(abstract, nnx.Param), ema=ema, step=step)
    return config, nnx.to_pure_dict(params), s


def num_params(model) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
