"""Pure train and eval steps for both tasks: classification (mixing, smoothing) and
semantic segmentation (per-pixel loss with an auxiliary head, confusion matrices); EMA,
BatchNorm statistics and the NaN guard are shared."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vim_jax.data.mixing import mix_batch


class TrainState(NamedTuple):
    """Everything a step reads and writes; a checkpoint holds exactly this."""
    step: jax.Array          # int32 scalar: the number of steps taken
    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State           # exponential moving average of params (== params when off)
    batch_stats: nnx.State   # BatchNorm running averages (empty for models without BatchNorm)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step (all off by default: plain cross-entropy)."""
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    seed: int = 0           # per-step keys for mixing and drop path are fold_in(seed, step)
    task: str = "classification"   # or "segmentation"
    aux_weight: float = 0.4        # segmentation: weight of the auxiliary head's loss
    class_weight: tuple = ()       # segmentation: per-class loss weights (mmseg's class_weight)


TASKS = ("classification", "segmentation")


def _classification_loss(opts: StepOptions, num_classes: int):
    def prepare(key, images, labels):
        return mix_batch(key, images, labels, num_classes=num_classes, mixup=opts.mixup,
                         cutmix=opts.cutmix, switch_prob=opts.mix_switch_prob,
                         smoothing=opts.label_smoothing)

    def loss(model, images, targets):
        return optax.softmax_cross_entropy(model(images).astype(jnp.float32), targets).mean()

    return prepare, loss


def _segmentation_loss(opts: StepOptions):
    from vim_jax.train.segmentation import pixel_cross_entropy

    weight = jnp.asarray(opts.class_weight, jnp.float32) if opts.class_weight else None

    def loss(model, images, labels):
        logits, aux = model.logits_and_aux(images)
        return (pixel_cross_entropy(logits, labels, class_weight=weight)
                + opts.aux_weight * pixel_cross_entropy(aux, labels, class_weight=weight))

    return (lambda key, images, labels: (images, labels)), loss


def train_step_fn(model: nnx.Module, tx: optax.GradientTransformation,
                  opts: StepOptions = StepOptions()):
    """Returns (step, state), ``step(state, images (b, H, W, C), labels) -> (state,
    metrics)`` not yet jitted (the caller picks shardings). Labels are (b,) class indices
    or, for segmentation, (b, H, W) pixel labels (255 ignored). ``model`` must be in train
    mode. BatchNorm statistics are over the whole (global) batch, like SyncBN."""
    if opts.task not in TASKS:
        raise ValueError(f"task={opts.task!r} is not one of {TASKS}")
    graphdef, params, keys, stats, rest = nnx.split(model, nnx.Param, nnx.RngKey, nnx.BatchStat, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.tree.map(jnp.copy, params), stats)
    prepare, loss_of = (_classification_loss(opts, model.num_classes)
                        if opts.task == "classification" else _segmentation_loss(opts))

    def step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.key(opts.seed), state.step)
        k_mix, k_drop = jax.random.split(key)
        images, targets = prepare(k_mix, images, labels)
        # Drop path draws from a key that depends only on the step: resumable, no RNG state.
        step_keys = jax.tree.map(lambda _: k_drop, keys)

        def loss_fn(params):
            m = nnx.merge(graphdef, params, step_keys, state.batch_stats, rest, copy=True)
            return loss_of(m, images, targets), nnx.state(m, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step is skipped: params, optimiser state (moments, schedule count)
        # and so the EMA stay as they were; only the step counter moves on.
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        batch_stats = jax.tree.map(keep, new_stats, state.batch_stats)
        if opts.ema_decay > 0:
            d = opts.ema_decay
            ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e),
                               state.ema, params)
        else:
            ema = params
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        return TrainState(state.step + 1, params, opt_state, ema, batch_stats), metrics

    return step, state


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation,
                    opts: StepOptions = StepOptions()):
    """Jitted ``train_step_fn`` for one device: ``(step, state)``."""
    step, state = train_step_fn(model, tx, opts)
    return jax.jit(step, donate_argnums=0), state


def eval_step_fn(model: nnx.Module, *, task: str = "classification", slide=None):
    """Returns ``eval_step(params, batch_stats, images, labels, mask) -> sums`` over the
    batch (mask 0 rows ignored); ``model`` in eval mode.

    Classification: correct@1, correct@5, loss and image count. Segmentation: the
    (num_classes, num_classes) confusion matrix, the summed per-pixel loss and labelled
    pixel count, and the image count; ``slide=(crop, stride)`` infers by sliding windows
    (mmseg's ``slide`` mode), None on the whole image.
    """
    from vim_jax.train import segmentation as seg

    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    k_classes = model.num_classes

    def classify(logits, labels, mask):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hit = top == labels[:, None]
        return {"correct1": jnp.sum(hit[:, 0] * mask), "correct5": jnp.sum(hit.any(-1) * mask),
                "loss": jnp.sum(loss * mask)}

    def segment(logits, labels, mask):
        valid = (labels != seg.IGNORE) & (mask[:, None, None] > 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        return {"confusion": seg.confusion_matrix(jnp.argmax(logits, -1), labels, k_classes, mask=mask),
                "loss": jnp.sum(jnp.where(valid, ce, 0.0)), "pixels": jnp.sum(valid)}

    def eval_step(params, batch_stats, images, labels, mask):
        m = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
        if slide:
            logits = seg.sliding_window_logits(m, images, crop=slide[0], stride=slide[1],
                                               num_classes=k_classes)
        else:
            logits = m(images).astype(jnp.float32)
        sums = (classify if task == "classification" else segment)(logits, labels, mask)
        return {**sums, "count": jnp.sum(mask)}

    return eval_step
