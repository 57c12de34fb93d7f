"""Evaluation: one pass over an eval split, of a training checkpoint or of given weights.

Classification reports top-1/top-5 and the mean loss; segmentation mIoU, per-class IoU and
accuracy, pixel accuracy (from one confusion matrix summed over every device and process)
and the mean per-pixel loss. Every accuracy and IoU is in percent.
"""

from __future__ import annotations

import copy
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vim_jax.parallel import sharding as shd
from vim_jax.train.progress import ProgressMeter
from vim_jax.train.config import build_model, load_config
from vim_jax.train.step import eval_step_fn

# The numbers logged, summarised and kept in metrics.json's history, per task.
REPORTED = {"classification": ("top1", "top5", "loss"), "segmentation": ("miou", "pixel_acc", "loss")}


def summary(r: dict) -> str:
    """One line of results, for either task."""
    if "miou" in r:
        miou = "-" if r["miou"] is None else f"{r['miou']:.2f}%"  # no labelled pixel
        head = f"mIoU {miou}  pixel accuracy {r['pixel_acc']:.2f}%"
    else:
        head = f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%"
    return f"{head}  loss {r['loss']:.4f}  ({r['count']} images, {r['img_per_s']:.1f} img/s)"


def _add(sums, out):
    out = {k: np.asarray(v).astype(np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float64)
           for k, v in jax.device_get(out).items()}
    return out if sums is None else {k: sums[k] + out[k] for k in sums}


def evaluate(eval_step, params, source, data_cfg, *, local_batch: int, sharding, corrupt=None,
             batch_stats=None) -> dict:
    """The metrics of ``params`` (and BatchNorm ``batch_stats``) on ``source``, with the
    image count and img/s."""
    from vim_jax.data.pipeline import eval_batches
    from vim_jax.train.segmentation import metrics_from_confusion

    batch_stats = nnx.State({}) if batch_stats is None else batch_stats
    sums, pending = None, None
    t = time.perf_counter()
    # Summed on the host in float64 / int64 (a confusion matrix of a large set passes
    # 2**31 pixels), one batch behind so the device never waits for the host.
    batches = shd.prefetch(eval_batches(source, data_cfg, local_batch=local_batch, corrupt=corrupt), sharding)
    with ProgressMeter(source.num_examples, "evaluating", enabled=jax.process_index() == 0) as progress:
        for batch in batches:
            out = eval_step(params, batch_stats, batch["image"], batch["label"], batch["mask"])
            if pending is not None:
                sums = _add(sums, pending)
            pending = out
            progress.update(local_batch)
    sums = _add(sums, pending)
    count = int(sums["count"])
    speed = {"count": count, "img_per_s": count / (time.perf_counter() - t)}
    if "confusion" in sums:
        return {**metrics_from_confusion(sums["confusion"]),
                "loss": float(sums["loss"]) / max(float(sums["pixels"]), 1.0), **speed}
    n = max(count, 1)
    return {"top1": 100 * float(sums["correct1"]) / n, "top5": 100 * float(sums["correct5"]) / n,
            "loss": float(sums["loss"]) / n, **speed}


def _evaluate_config(config, num_classes: int, load=None, after=None) -> tuple:
    """Builds ``config``'s model, optionally replaces its variables with ``load(params,
    batch_stats) -> (info, params, batch_stats)``, and evaluates on ``config.data``'s eval
    split: (info, results). ``after(model, source)`` runs on the loaded model last."""
    from vim_jax.data.sources import make_source
    from vim_jax.train.setup import slide_of, task_of

    d = config.data
    source = make_source(d.name, d.data_dir, d.eval_split, process_index=jax.process_index(),
                         process_count=jax.process_count())
    mesh = shd.make_mesh()
    model = build_model(config, num_classes or source.num_classes)
    replicated = lambda tree: jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    param_sh, stats_sh = replicated(params), replicated(stats)
    bs = shd.batch_sharding(mesh)
    step = eval_step_fn(model, task=task_of(config), slide=slide_of(config))
    eval_step = shd.jit_on_mesh(mesh, step, in_shardings=(param_sh, stats_sh, bs, bs, bs),
                                out_shardings=NamedSharding(mesh, P()))
    params, stats = shd.put_global(params, param_sh), shd.put_global(stats, stats_sh)
    info, params, stats = load(params, stats) if load else (None, params, stats)
    local_batch = (config.train.eval_batch_size or config.optim.batch_size) // jax.process_count()
    out = evaluate(eval_step, params, source, d, local_batch=local_batch, sharding=bs, batch_stats=stats)
    if after is not None:
        nnx.update(model, jax.device_get(params), jax.device_get(stats))
        after(model, source)
    return info, out


def evaluate_workdir(workdir: str, *, step: Optional[int] = None, ema: bool = False,
                     after=None) -> dict:
    """Evaluates checkpoint ``step`` (default latest) of a training workdir with its config;
    ``after(model, source)`` gets the evaluated model (e.g. to draw predictions)."""
    from vim_jax.weights.checkpoints import Checkpoints

    from vim_jax.train.setup import task_of

    config = load_config(workdir)
    config.model.pretrained = ""  # the weights come from the checkpoint

    def load(params, stats):
        s, params, stats = Checkpoints(workdir).restore_params(params, ema=ema, step=step,
                                                               batch_stats=stats)
        return s, params, stats

    s, out = _evaluate_config(config, config.model.num_classes, load, after)
    return {"step": s, "ema": ema, "task": task_of(config), **out}


def evaluate_pretrained(config, pretrained: str, *, model: Optional[str] = None) -> dict:
    """Evaluates weights from ``pretrained`` on the eval split ``config.data`` names."""
    config = copy.deepcopy(config)
    config.model.pretrained = pretrained
    if model:
        config.model.name = model
    _, out = _evaluate_config(config, config.model.num_classes)
    return {"pretrained": pretrained, "model": config.model.name, **out}


def draw_predictions(model, source, config, path: str) -> str:
    """Writes a PNG of the first ``config.seg.plot_images`` eval images of ``source`` with
    their ground truth and ``model``'s predictions (segmentation); returns ``path``."""
    from vim_jax.data.pipeline import eval_batches
    from vim_jax.train.seg_figure import save_predictions
    from vim_jax.train.segmentation import sliding_window_logits
    from vim_jax.train.setup import slide_of

    n = config.seg.plot_images
    batch = next(eval_batches(source, config.data, local_batch=n))
    slide = slide_of(config)

    @nnx.jit
    def predict(m, images):
        logits = (sliding_window_logits(m, images, crop=slide[0], stride=slide[1],
                                        num_classes=m.num_classes) if slide else m(images))
        return jnp.argmax(logits, -1)

    model.eval()
    keep = batch["mask"] > 0
    preds = jax.device_get(predict(model, batch["image"]))
    names = CLASS_NAMES.get(config.data.name, ())
    save_predictions(path, batch["image"][keep], batch["label"][keep], preds[keep],
                     mean=config.data.mean, std=config.data.std, class_names=names)
    return path


CLASS_NAMES = {"digits_seg": ("background",) + tuple(str(d) for d in range(10))}
