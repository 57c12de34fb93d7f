"""Evaluation: one pass over an eval split, of a training checkpoint or of given weights."""

from __future__ import annotations

import copy
import time
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vim_jax import sharding as shd
from vim_jax.run_config import build_model, load_config
from vim_jax.train_step import eval_step_fn


def evaluate(eval_step, params, source, data_cfg, *, local_batch: int, sharding, corrupt=None) -> dict:
    """Top-1/top-5 (%), mean loss, image count and img/s of ``params`` on ``source``."""
    from vim_jax.data.pipeline import eval_batches

    sums = None
    t = time.perf_counter()
    for batch in shd.prefetch(eval_batches(source, data_cfg, local_batch=local_batch, corrupt=corrupt), sharding):
        out = eval_step(params, batch["image"], batch["label"], batch["mask"])
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    n = max(sums["count"], 1.0)
    return {"top1": 100 * sums["correct1"] / n, "top5": 100 * sums["correct5"] / n,
            "loss": sums["loss"] / n, "count": int(sums["count"]),
            "img_per_s": sums["count"] / (time.perf_counter() - t)}


def _evaluate_config(config, num_classes: int, load=None) -> dict:
    """Builds ``config``'s model, optionally replaces its params with ``load(params) ->
    (info, params)``, and evaluates on ``config.data``'s eval split: (info, results)."""
    from vim_jax.data.sources import make_source

    d = config.data
    source = make_source(d.name, d.data_dir, d.eval_split, process_index=jax.process_index(),
                         process_count=jax.process_count())
    mesh = shd.make_mesh()
    model = build_model(config, num_classes or source.num_classes)
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), nnx.state(model, nnx.Param))
    bs = shd.batch_sharding(mesh)
    eval_step = shd.jit_on_mesh(mesh, eval_step_fn(model), in_shardings=(param_sh, bs, bs, bs))
    params = shd.put_global(nnx.state(model, nnx.Param), param_sh)
    info, params = load(params) if load else (None, params)
    local_batch = (config.train.eval_batch_size or config.optim.batch_size) // jax.process_count()
    return info, evaluate(eval_step, params, source, d, local_batch=local_batch, sharding=bs)


def evaluate_workdir(workdir: str, *, step: Optional[int] = None, ema: bool = False) -> dict:
    """Evaluates checkpoint ``step`` (default latest) of a training workdir with its config."""
    from vim_jax.checkpoints import Checkpoints

    config = load_config(workdir)
    config.model.pretrained = ""  # the weights come from the checkpoint
    s, out = _evaluate_config(config, config.model.num_classes, lambda params: Checkpoints(
        workdir).restore_params(params, ema=ema, step=step))
    return {"step": s, "ema": ema, **out}


def evaluate_pretrained(config, pretrained: str, *, model: Optional[str] = None) -> dict:
    """Evaluates weights from ``pretrained`` on the eval split ``config.data`` names."""
    config = copy.deepcopy(config)
    config.model.pretrained = pretrained
    if model:
        config.model.name = model
    _, out = _evaluate_config(config, config.model.num_classes)
    return {"pretrained": pretrained, "model": config.model.name, **out}
