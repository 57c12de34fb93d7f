"""The model's numerical operations, each implemented per platform in one place.

A program is traced once and may be lowered for several platforms (``jax.export`` to
``("cpu", "cuda")``, or a CUDA program built on a CPU host), so a choice of
implementation is made with ``jax.lax.platform_dependent`` from the platform the
program is *lowered for*, never from the host's default backend. The CPU gets the
tricks that XLA's CPU backend needs to be fast; every other platform gets plain JAX:

- ``silu``, and the reference scan's exp and softplus (``vim_jax.mixers.selective_scan``): on the CPU a
  2^n * p(f) polynomial exp (XLA's CPU exp dominated the scan and the activations around
  it; this form vectorises and fuses at about half the cost, with float32-level accuracy).
- ``dense``: on the CPU a projection whose weight gradient reads a transposed copy of
  x (XLA's CPU layout pass would otherwise transpose the incoming gradient inside the
  elementwise kernel that produces it, several times slower).
- ``select_layer``: on the CPU per-layer vectors are picked by a one-hot product (XLA's
  CPU emitter runs an elementwise kernel with a fused dynamic slice several times
  slower).

The selective scan's backend choice lives in ``vim_jax.mixers.selective_scan`` and uses the same
mechanism.

``portable=True`` takes the plain-JAX form without a ``platform_dependent`` around it:
the program then holds only standard operations, which converters such as jax2onnx
read (the models' export mode, ``model.set_attributes(portable=True)``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vim_jax.kernels.activations import sigmoid, softplus_formula

# ----------------------------------------------------------------------------
# The CPU's polynomial exp and the functions built on it.


@jax.custom_jvp
def poly_exp(x):
    """exp(x) computed in float32 by a polynomial, returned in x's dtype (CPU fast path).

    2^y with y = x log2(e) split into n + f: 2^n from the exponent bits, 2^f from a
    degree-5 near-minimax polynomial (1.5e-7). The rounding of y grows the relative error
    with |x|: below 5e-7 + 7e-8 * |x| in all, so below 1e-6 for |x| < 7, where decay
    factors and activations live, and 6.6e-6 at |x| = 87, where exp(x) is below 1e-37 or
    beyond 1e37. Underflow saturates at exp(-87.3) ~ 1e-38 (harmless for a decay factor);
    the input is clipped at 88. Its derivative is the exact one, not the polynomial's.
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


@poly_exp.defjvp
def _poly_exp_jvp(primals, tangents):
    y = poly_exp(primals[0])
    return y, y * tangents[0]


@jax.custom_jvp
def _poly_silu(x):
    return x * sigmoid(x, poly_exp)


@_poly_silu.defjvp
def _poly_silu_jvp(primals, tangents):
    x, = primals
    s = sigmoid(x, poly_exp)
    return x * s, s * (1.0 + x * (1.0 - s)) * tangents[0]


def _per_platform(*args, cpu, default, portable: bool):
    """``cpu(*args)`` where lowered for the CPU, ``default(*args)`` elsewhere; with
    ``portable``, ``default(*args)`` with no platform choice in the program."""
    if portable:
        return default(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def silu(x, *, portable: bool = False):
    """x * sigmoid(x); the polynomial form where lowered for the CPU."""
    return _per_platform(x, cpu=_poly_silu, default=jax.nn.silu, portable=portable)


def poly_softplus(x):
    """``softplus_formula`` with the polynomial exp (the CPU's reference scan uses it)."""
    return softplus_formula(x, poly_exp)


# ----------------------------------------------------------------------------
# Projections.


@jax.custom_vjp
def _dense_cpu(x, w):
    return x @ w


def _dense_cpu_fwd(x, w):
    return x @ w, (x, w)


def _dense_cpu_bwd(res, g):
    x, w = res
    # The barrier keeps the transpose a copy of its own: XLA would fold it into the dot.
    # Flattening keeps the batch axis leading, so a batch-sharded x stays sharded.
    xt = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    gw = xt @ g.reshape(-1, g.shape[-1]).astype(x.dtype)
    return (g @ w.T.astype(g.dtype)).astype(x.dtype), gw.astype(w.dtype)


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


def _matmul(x, w):
    return x @ w


def dense(x, w, *, portable: bool = False):
    """x (..., i) @ w (i, o) -> (..., o)."""
    return _per_platform(x, w, cpu=_dense_cpu, default=_matmul, portable=portable)


# ----------------------------------------------------------------------------
# Per-layer parameters inside the loop over stacked layers.


def _is_matmul_kernel(path) -> bool:
    return jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value").endswith("kernel")


def _select_by_index(stacked, i):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacked)


def _select_cpu(stacked, i):
    depth = jax.tree.leaves(stacked)[0].shape[0]
    onehot = jax.nn.one_hot(i, depth, dtype=jnp.float32)

    def take(path, x):
        if _is_matmul_kernel(path):
            return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
        return jnp.tensordot(onehot.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST)

    return jax.tree_util.tree_map_with_path(take, stacked)


def select_layer(stacked, i, *, portable: bool = False):
    """Layer i's slice of a pytree of stacked (depth, ...) arrays; i may be traced."""
    return _per_platform(stacked, i, cpu=_select_cpu, default=_select_by_index, portable=portable)


# ----------------------------------------------------------------------------
# The mixer's depthwise causal convolution (every platform).


def _conv_taps(x, k: int, anti_causal: bool):
    """The k shifted views of x (batch, L, d) that multiply weight[0..k-1]."""
    L = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (0, k - 1), (0, 0)) if anti_causal else ((0, 0), (k - 1, 0), (0, 0)))
    return [xp[:, (k - 1 - j) if anti_causal else j:][:, :L] for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv(x, weight, bias, anti_causal: bool):
    """Depthwise 1-D convolution along the sequence.

    x: (batch, L, d); weight: (k, d); bias: (d,). Causal: out[t] = sum_j w[j] x[t-k+1+j].
    Anti-causal is the causal conv of the flipped sequence, flipped back:
    out[t] = sum_j w[j] x[t+k-1-j], computed on the original order (no flipped copy).
    """
    taps = _conv_taps(x, weight.shape[0], anti_causal)
    return sum(t * weight[j] for j, t in enumerate(taps)) + bias


def _conv_fwd(x, weight, bias, anti_causal):
    return depthwise_conv(x, weight, bias, anti_causal), (x, weight)


def _conv_bwd(anti_causal, res, g):
    # The transpose of a causal conv is the anti-causal conv with the same taps: one padded
    # copy of g rather than one per tap, which XLA would otherwise materialise and sum.
    x, weight = res
    k = weight.shape[0]
    gx = sum(t * weight[j] for j, t in enumerate(_conv_taps(g, k, not anti_causal)))
    gw = jnp.stack([jnp.sum(g * t, axis=(0, 1)) for t in _conv_taps(x, k, anti_causal)])
    return gx.astype(x.dtype), gw.astype(weight.dtype), jnp.sum(g, axis=(0, 1)).astype(weight.dtype)


depthwise_conv.defvjp(_conv_fwd, _conv_bwd)
