"""Pure train and eval steps for any NNX classifier: mixing, smoothing, EMA, NaN guard."""

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


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step (all off by default: plain cross-entropy)."""
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    seed: int = 0           # per-step keys for mixing and drop path are fold_in(seed, step)


def train_step_fn(model: nnx.Module, tx: optax.GradientTransformation,
                  opts: StepOptions = StepOptions()):
    """Returns (step, state), ``step(state, images (b, H, W, C), labels (b,)) -> (state,
    metrics)`` not yet jitted (the caller picks shardings). ``model`` must be in train mode."""
    graphdef, params, keys, rest = nnx.split(model, nnx.Param, nnx.RngKey, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.tree.map(jnp.copy, params))
    num_classes = model.num_classes

    def step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.key(opts.seed), state.step)
        k_mix, k_drop = jax.random.split(key)
        images, targets = mix_batch(k_mix, images, labels, num_classes=num_classes,
                                    mixup=opts.mixup, cutmix=opts.cutmix,
                                    switch_prob=opts.mix_switch_prob,
                                    smoothing=opts.label_smoothing)
        # Drop path draws from a key that depends only on the step: resumable, no RNG state.
        step_keys = jax.tree.map(lambda _: k_drop, keys)

        def loss_fn(params):
            m = nnx.merge(graphdef, params, step_keys, rest, copy=True)
            return optax.softmax_cross_entropy(m(images).astype(jnp.float32), targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step is skipped: params, optimiser state (moments, schedule count)
        # and so the EMA stay as they were; only the step counter moves on.
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        if opts.ema_decay > 0:
            d = opts.ema_decay
            ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e),
                               state.ema, params)
        else:
            ema = params
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return step, state


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation,
                    opts: StepOptions = StepOptions()):
    """Jitted ``train_step_fn`` for one device: ``(step, state)``."""
    step, state = train_step_fn(model, tx, opts)
    return jax.jit(step, donate_argnums=0), state


def eval_step_fn(model: nnx.Module):
    """Returns ``eval_step(params, images, labels, mask) -> sums`` of correct@1, correct@5,
    loss and count over the batch (mask 0 rows ignored); ``model`` in eval mode."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def eval_step(params, images, labels, mask):
        logits = nnx.merge(graphdef, params, rest, copy=True)(images).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        k = min(5, logits.shape[-1])
        top = jax.lax.top_k(logits, k)[1]
        hit = top == labels[:, None]
        return {"correct1": jnp.sum(hit[:, 0] * mask), "correct5": jnp.sum(hit.any(-1) * mask),
                "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    return eval_step
