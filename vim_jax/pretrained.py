"""Checkpoint files: official state dicts (.pth/.npz) and this project's checkpoint directories.

One directory format for trained and converted models alike, a training workdir's:
``model.json`` (the variant name and every model argument) and
``checkpoints/<step>/{params, ema[, opt_state]}`` (orbax, ``vim_jax.checkpoints``).
``python -m vim_jax.convert`` writes step 0 with ``ema`` equal to ``params``.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from vim_jax import pth
from vim_jax.models.vim import resize_pos_embed
from vim_jax.state_dict import mismatches, state_dict_to_params

MODEL_FILE = "model.json"


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Reads an official state dict: ``.pth`` (``{"model": sd}`` or a bare sd) or ``.npz``."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if path.suffix in (".pth", ".pt", ".bin"):
        obj = pth.load(path)  # no PyTorch needed; refuses anything but tensors and dicts
        sd = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
        return {k: v.astype(np.float32) if pth.is_floating(v.dtype) else v
                for k, v in sd.items() if isinstance(v, np.ndarray)}
    raise ValueError(f"checkpoint {path}: unknown format {path.suffix!r}; expected .pth, .pt, "
                     ".bin, .npz or a checkpoint directory")


def _grid(model, img_size):
    return (model._grid_len(img_size),) * 2


def load_state_dict_into(model, state_dict, *, ckpt_img_size=None):
    """Loads an official state dict into ``model`` (in place); resizes pos_embed if needed."""
    params = nnx.state(model, nnx.Param)
    old = _grid(model, ckpt_img_size) if ckpt_img_size else model.grid
    resize = lambda pos: resize_pos_embed(pos, model.cls_position, old, model.grid)
    pure = state_dict_to_params(state_dict, nnx.to_pure_dict(params), cls_position=model.cls_position,
                                pos_embed_fn=resize)
    nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, pure))
    nnx.update(model, params)


def load_params_into(model, pure: dict, *, saved_img_size=None, source=""):
    """Loads a nested param dict written by ``save_pretrained`` into ``model`` (in place)."""
    params = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(params)
    if saved_img_size and _grid(model, saved_img_size) != model.grid:
        pure = dict(pure, pos_embed=resize_pos_embed(
            pure["pos_embed"], model.cls_position, _grid(model, saved_img_size), model.grid))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(pure)}
    problems = mismatches(want, got)
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model:\n  " + "\n  ".join(problems))
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)


def write_model_config(directory, model) -> None:
    """Writes ``model.config`` as ``directory/model.json`` (atomically)."""
    directory = pathlib.Path(directory)
    tmp = directory / (MODEL_FILE + ".tmp")
    tmp.write_text(json.dumps(model.config, indent=2, sort_keys=True))
    os.replace(tmp, directory / MODEL_FILE)


def save_pretrained(model, out_dir) -> pathlib.Path:
    """Writes ``model`` as a checkpoint directory (step 0); returns its path."""
    from vim_jax.checkpoints import Checkpoints

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
    from vim_jax.checkpoints import Checkpoints

    s, params, stats = Checkpoints(str(path)).restore_params(
        nnx.state(model, nnx.Param), ema=ema, step=step, batch_stats=nnx.state(model, nnx.BatchStat))
    nnx.update(model, params, stats)
    return s


def load_dir(path, *, step=None, ema: bool = False) -> tuple[dict, dict, int]:
    """Reads a checkpoint directory or training workdir -> (model config incl. "name",
    nested param dict, step): the latest step unless ``step``, the EMA weights if ``ema``."""
    from vim_jax.checkpoints import Checkpoints
    from vim_jax.models.vim import VisionMamba

    path = pathlib.Path(path).resolve()
    cfg_file = path / MODEL_FILE
    if not cfg_file.exists():
        old = " (it was written by an older vim-jax: convert the original checkpoint again)" \
            if (path / "vim_config.json").exists() else ""
        raise FileNotFoundError(f"{path} is not a vim-jax checkpoint directory: no {MODEL_FILE}, "
                                f"which training workdirs and python -m vim_jax.convert write{old}")
    config = json.loads(cfg_file.read_text())
    kwargs = {k: v for k, v in config.items() if k != "name"}
    kwargs["dtype"] = np.dtype(kwargs.get("dtype") or "float32")
    abstract = nnx.eval_shape(lambda: VisionMamba(**kwargs, rngs=nnx.Rngs(0)))
    s, params = Checkpoints(str(path)).restore_params(nnx.state(abstract, nnx.Param), ema=ema, step=step)
    return config, nnx.to_pure_dict(params), s


def num_params(model) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
