"""Cheap float32 elementwise functions for the CPU: exp, softplus, silu.

XLA's CPU exp dominates the selective scan and the activations around it; a 2^n * p(f)
form vectorises and fuses at about half the cost, with float32-level accuracy where the
values matter.
Derivatives are the exact ones (custom JVPs), not those of the polynomial.
"""

import jax
import jax.numpy as jnp


@jax.custom_jvp
def exp(x):
    """exp(x) computed in float32, returned in x's dtype.

    2^y with y = x log2(e) split into n + f: 2^n from the exponent bits, 2^f from a
    degree-5 near-minimax polynomial (1.5e-7). The rounding of y grows the relative error
    with |x|: below 5e-7 + 7e-8 * |x| in all, so below 1e-6 for |x| < 7, where decay
    factors and activations live, and 6.6e-6 at |x| = 87, where exp(x) is below 1e-37 or
    beyond 1e37. Underflow saturates at exp(-87.3) ~ 1e-38 (harmless for a decay factor);
    the input is clipped at 88.
    The one-step reduction is 5% faster end to end than a two-step (Cody-Waite) one.
    """
    dtype = x.dtype
    y = jnp.clip(x.astype(jnp.float32) * _LOG2E, -126.0, 127.0)
    n = jnp.floor(y)
    f = y - n
    p = _EXP2_POLY[0]
    for c in _EXP2_POLY[1:]:
        p = p * f + c
    scale = jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)
    return (p * scale).astype(dtype)


_LOG2E = 1.4426950408889634
# Near-minimax fit of 2^f on [0, 1), highest degree first: relative error 1.5e-7.
_EXP2_POLY = (0.0018756046476014476, 0.008987467181808206, 0.05583499001952791,
              0.24014722987984782, 0.6931545545151324, 0.999999846249464)


@exp.defjvp
def _exp_jvp(primals, tangents):
    y = exp(primals[0])
    return y, y * tangents[0]  # the exact derivative, not the polynomial's


def sigmoid(x):
    """1 / (1 + e^-x)."""
    return 1.0 / (1.0 + exp(-x))


@jax.custom_jvp
def softplus(x):
    """log(1 + e^x); where e^-|x| < 2^-24 the log term is 0 (absolute error below 6e-8)."""
    return jnp.maximum(x, 0.0) + jnp.log(1.0 + exp(-jnp.abs(x)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    x, = primals
    return softplus(x), sigmoid(x) * tangents[0]


@jax.custom_jvp
def silu(x):
    """x * sigmoid(x)."""
    return x * sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    x, = primals
    s = sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s)) * tangents[0]
