"""Per-platform operations: the CPU's polynomial math, the softplus, the projection and
conv VJPs, and which implementation a program lowered for each platform holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.kernels.activations import softplus_formula
from vim_jax.mixers import ops


def assert_close(got, want, tol):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


def lowered(f, *args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_polynomial_math_values_and_derivatives():
    x = jnp.linspace(-80.0, 30.0, 20001)
    # exp: the documented relative error bound 5e-7 + 7e-8 * |x|, value and derivative.
    bound = 5e-7 + 7e-8 * np.abs(np.asarray(x))
    for f in (ops.poly_exp, jax.vmap(jax.grad(ops.poly_exp))):
        rel = np.abs(np.asarray(f(x), np.float64) / np.exp(np.asarray(x, np.float64)) - 1)
        assert np.all(rel <= bound), float((rel / bound).max())
    # The O(1)-valued functions (on this CPU: the polynomial forms), within a few ulps of
    # their magnitude, values and derivatives.
    for fast, exact in ((ops.silu, jax.nn.silu), (ops.poly_softplus, jax.nn.softplus),
                        (lambda x: ops.sigmoid(x, ops.poly_exp), jax.nn.sigmoid)):
        assert np.allclose(fast(x), exact(x), rtol=5e-7, atol=1e-6), fast.__name__
        g_fast = jax.vmap(jax.grad(fast))(x)
        g_exact = jax.vmap(jax.grad(exact))(x)
        assert np.allclose(g_fast, g_exact, rtol=5e-7, atol=1e-6), fast.__name__
    assert ops.poly_exp(jnp.zeros(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_softplus_is_accurate_for_small_values():
    """log1p(exp(x)) keeps its relative accuracy where softplus is tiny (small dt); the
    log(1 + exp(x)) form loses it all by x = -17 (1 + exp(x) rounds to 1)."""
    x = np.linspace(-40.0, 40.0, 8001, dtype=np.float32)
    want = np.where(x > 20, x, np.log1p(np.exp(x.astype(np.float64))))
    for name, f, bound in (("formula", softplus_formula, 1e-6 + 0 * x),
                           ("the CPU's", ops.poly_softplus, 1e-6 + 7e-8 * np.abs(x))):
        rel = np.abs(np.asarray(jax.jit(f)(x), np.float64) / want - 1)
        assert np.all(rel <= bound), (name, float(rel.max()), float(x[np.argmax(rel / bound)]))
    old = np.log(1 + np.exp(x[x < -17]))
    assert np.all(old == 0)  # what the previous form gave


def test_each_platform_gets_its_own_implementation():
    """One traced function, lowered for the CPU and for CUDA: the CPU program holds the
    polynomial exp, the projection's transposed-copy VJP and the one-hot layer pick; the
    CUDA program holds none of them."""
    x = jnp.linspace(-3, 3, 64).reshape(2, 4, 8)
    w = jnp.ones((8, 5))
    np.testing.assert_array_equal(ops.silu(x), ops._poly_silu(x))  # what this CPU runs
    silu_cpu, silu_cuda = (lowered(ops.silu, x, platform=p) for p in ("cpu", "cuda"))
    assert "bitcast_convert" in silu_cpu and "exponential" not in silu_cpu
    assert "bitcast_convert" not in silu_cuda and "exponential" in silu_cuda
    grad = jax.grad(lambda x, w: jnp.sum(ops.dense(x, w) ** 2), argnums=(0, 1))
    assert "optimization_barrier" in lowered(grad, x, w, platform="cpu")
    assert "optimization_barrier" not in lowered(grad, x, w, platform="cuda")
    stacked = {"norm": jnp.ones((3, 8)), "kernel": jnp.ones((3, 8, 5))}
    pick_cpu, pick_cuda = (lowered(ops.select_layer, stacked, 1, platform=p) for p in ("cpu", "cuda"))
    assert pick_cpu.count("dot_general") == 1 and pick_cpu.count("dynamic_slice ") == 1
    assert "dot_general" not in pick_cuda and pick_cuda.count("dynamic_slice ") == 2
    for name, leaf in ops.select_layer(stacked, 1).items():
        np.testing.assert_array_equal(leaf, stacked[name][1])


@pytest.mark.parametrize("anti_causal", [False, True])
def test_depthwise_conv_values_and_gradients(anti_causal):
    """The conv's hand-written VJP against autodiff of XLA's grouped convolution."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6))
    b = jax.random.normal(jax.random.key(2), (6,))
    g = jax.random.normal(jax.random.key(3), (2, 11, 6))

    def reference(x, w, b):
        if anti_causal:  # the causal conv of the flipped sequence, flipped back
            return reference_causal(x[:, ::-1], w, b)[:, ::-1]
        return reference_causal(x, w, b)

    def reference_causal(x, w, b):
        y = jax.lax.conv_general_dilated(x, w[:, None, :], (1,), [(3, 0)],
                                         dimension_numbers=("NWC", "WIO", "NWC"),
                                         feature_group_count=6, precision="highest")
        return y + b

    ours = lambda *a: jnp.sum(ops.depthwise_conv(*a, anti_causal) * g)
    want = lambda *a: jnp.sum(reference(*a) * g)
    assert_close(ops.depthwise_conv(x, w, b, anti_causal), reference(x, w, b), tol=1e-5)
    for got, exp in zip(jax.grad(ours, argnums=(0, 1, 2))(x, w, b),
                        jax.grad(want, argnums=(0, 1, 2))(x, w, b)):
        assert_close(got, exp, tol=1e-5)



def test_dense_values_and_gradients():
    """The projection's hand-written VJP (weight gradient from a transposed copy of x)
    against autodiff of the plain matmul."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    w = jax.random.normal(jax.random.key(1), (6, 7))
    g = jax.random.normal(jax.random.key(2), (2, 5, 7))
    assert_close(ops.dense(x, w), x @ w, tol=1e-5)
    got = jax.grad(lambda x, w: jnp.sum(ops.dense(x, w) * g), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum((x @ w) * g), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        assert_close(a, b, tol=1e-5)
