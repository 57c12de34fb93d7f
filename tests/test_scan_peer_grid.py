"""The Pallas selective-scan kernels, both layouts, in interpret mode on mamba-ssm's own
kernel-test grid, against the reference backend (values and every gradient)."""

import jax
import jax.numpy as jnp
import pytest

from test_pallas_scan import grads
from test_selective_scan import rel_err


def mamba_grid_inputs(seqlen, dtype):
    """Inputs as mamba-ssm's own kernel test draws them (tests/ops/test_selective_scan.py:
    batch 2, dim 4, dstate 8, A = -0.5 U(0, 1), delta and delta_bias 0.5 U(0, 1), the
    rest standard normal; u, delta, z, B and C in the input dtype), channels-last."""
    k = jax.random.split(jax.random.key(seqlen), 9)
    b, d, n = 2, 4, 8
    cast = lambda x: x.astype(dtype)
    return dict(u=cast(jax.random.normal(k[0], (b, seqlen, d))),
                delta=cast(0.5 * jax.random.uniform(k[1], (b, seqlen, d))),
                A=-0.5 * jax.random.uniform(k[2], (d, n)), B=cast(jax.random.normal(k[3], (b, seqlen, n))),
                C=cast(jax.random.normal(k[4], (b, seqlen, n))), D=jax.random.normal(k[5], (d,)),
                z=cast(jax.random.normal(k[6], (b, seqlen, d))),
                delta_bias=0.5 * jax.random.uniform(k[7], (d,)))


# mamba-ssm's grid: every length and input dtype it tests its CUDA kernel at (~5 s a case).
@pytest.mark.parametrize("seqlen", [128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mamba_ssm_grid(seqlen, dtype, scan_layout):
    """The kernels against the reference backend on mamba-ssm's test grid (softplus, z, D,
    delta_bias, the last state), values and every gradient: float32 to 1e-4, half
    precision to 2^-7 (both compute in float32 from the same inputs; the outputs differ
    by their rounding)."""
    args = mamba_grid_inputs(seqlen, jnp.dtype(dtype))
    out_p, last_p, g_p = grads(args, "pallas", reverse=False)
    out_r, last_r, g_r = grads(args, "reference", reverse=False)
    tol = 1e-4 if dtype == "float32" else 2 ** -7
    assert out_p.dtype == jnp.dtype(dtype)
    assert rel_err(out_p, out_r) < tol and rel_err(last_p, last_r) < tol
    for k in g_r:
        assert rel_err(g_p[k], g_r[k]) < tol, k
