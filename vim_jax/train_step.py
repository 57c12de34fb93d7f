"""A pure, jittable supervised train step for any NNX classifier."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
    """Everything a step reads and writes: params, optimiser state, other module state."""
    params: nnx.State
    opt_state: optax.OptState
    rest: nnx.State  # RNG counters and anything else that is not a Param


def cross_entropy(logits, labels):
    """Mean cross-entropy; labels are class ids (batch,) or soft targets (batch, classes)."""
    logits = logits.astype(jnp.float32)
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation):
    """Returns (step, state): ``step(state, images, labels) -> (state, {"loss": ...})``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(params, tx.init(params), rest)

    @jax.jit
    def step(state: TrainState, images, labels):
        # Fresh Variables (copy=True) from arguments: the RNG counters are updated in this trace.
        def loss_fn(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = cross_entropy(m(images), labels)
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, rest), {"loss": loss}

    return step, state
