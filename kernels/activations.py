"""The official softplus and sigmoid, written once for the Pallas kernels and the XLA
reference scan (``vim_jax.mixers``), so that both compute the same function; each takes the
exponential to use (the kernels ``jnp.exp``, the CPU's reference a polynomial one)."""

import jax.numpy as jnp

SOFTPLUS_THRESHOLD = 20.0


def softplus_formula(x, exp=jnp.exp):
    """The official softplus: log1p(exp(x)), and x itself above 20 (PyTorch's threshold).

    log1p keeps small values (very negative x, small dt) accurate, where log(1 + exp)
    rounds 1 + exp(x) first. ``exp`` is the exponential to use; the Pallas kernels call
    this with ``jnp.exp``. The clamp is a select, not ``jnp.minimum``: Triton lowers a
    float minimum to the NaN-dropping ``minnumf``, which would turn a NaN into 20 on a GPU.
    """
    big = x > SOFTPLUS_THRESHOLD
    return jnp.where(big, x, jnp.log1p(exp(jnp.where(big, SOFTPLUS_THRESHOLD, x))))


def sigmoid(x, exp=jnp.exp):
    """1 / (1 + exp(-x)) with the given ``exp`` (the kernels and the scan pick theirs)."""
    return 1.0 / (1.0 + exp(-x))
