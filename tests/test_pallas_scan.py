"""Pallas selective-scan kernels in interpret mode against the reference backend and the
official numbers, and the Vim-Ti train step lowered for CUDA (no GPU needed)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import kernels.selective_scan as pallas_scan
from test_selective_scan import NAMES, channels_last, random_inputs, rel_err
from vim_jax import create_model, scan as ss
from vim_jax.train_step import make_train_step


def grads(args, backend, reverse, softplus=True, cot_seed=9):
    b, l, d = args["u"].shape
    cot = jax.random.normal(jax.random.key(cot_seed), (b, l, d))
    cot_last = jax.random.normal(jax.random.key(cot_seed + 1), (b,) + args["A"].shape)
    diff = {k: v for k, v in args.items() if v is not None}

    def loss(diff):
        out, last = ss.selective_scan(**{**args, **diff}, delta_softplus=softplus, reverse=reverse,
                                      return_last_state=True, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * cot) + jnp.sum(last * cot_last), (out, last)

    (_, (out, last)), g = jax.value_and_grad(loss, has_aux=True)(diff)
    return out, last, g


def assert_same_as_reference(args, reverse, tol=1e-4):
    out_p, last_p, g_p = grads(args, "pallas", reverse)
    out_r, last_r, g_r = grads(args, "reference", reverse)
    assert rel_err(out_p, out_r) < tol and rel_err(last_p, last_r) < tol
    for k in g_r:
        assert rel_err(g_p[k], g_r[k]) < tol, k


def test_official_fixture(scan_ref):
    args = channels_last(scan_ref)
    cot = jnp.asarray(scan_ref["cotangent"].transpose(0, 2, 1))
    out, last = ss.selective_scan(**args, delta_softplus=True, return_last_state=True, backend="pallas")
    assert rel_err(out, scan_ref["out"].transpose(0, 2, 1)) < 1e-4
    assert rel_err(last, scan_ref["last_state"]) < 1e-4
    g = jax.grad(lambda a: jnp.sum(ss.selective_scan(**a, delta_softplus=True, backend="pallas") * cot))(args)
    for k in NAMES:
        got = np.asarray(g[k])
        assert rel_err(got.transpose(0, 2, 1) if got.ndim == 3 else got, scan_ref[f"grad_{k}"]) < 1e-4, k


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("l,d", [(197, 48), (37, 40), (70, 24)])   # lengths past a chunk; channel tails
def test_odd_lengths_and_widths(l, d, reverse):
    assert_same_as_reference(random_inputs(l + d, 2, l, d, 16), reverse)


@pytest.mark.parametrize("opts", [dict(with_z=False), dict(with_d=False, with_bias=False),
                                  dict(with_d=False, with_z=False, with_bias=False)])
def test_optional_inputs(opts):
    assert_same_as_reference(random_inputs(5, 2, 21, 16, 8, **opts), reverse=True)


# Each example compiles a new program (~15 s): kept out of CI, run with -m slow.
@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 80), d=st.integers(1, 70),
       log_n=st.integers(0, 4), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(b, l, d, log_n, reverse, seed):
    assert_same_as_reference(random_inputs(seed, b, l, d, 2 ** log_n), reverse)


def test_bfloat16_inputs():
    args = random_inputs(7, 2, 33, 24, 16)
    half = {k: (v.astype(jnp.bfloat16) if v is not None and v.ndim == 3 else v) for k, v in args.items()}
    out_p, _, g_p = grads(half, "pallas", reverse=False)
    out_r, _, g_r = grads(half, "reference", reverse=False)
    assert out_p.dtype == jnp.bfloat16 and g_p["u"].dtype == jnp.bfloat16
    # Both compute in float32 from the same bfloat16 inputs; the outputs differ by at most
    # bfloat16 rounding (2^-8 relative).
    assert rel_err(out_p, out_r) < 2 ** -7
    for k in g_r:
        assert rel_err(g_p[k], g_r[k]) < 2 ** -7, k


def test_non_power_of_two_state_is_refused():
    args = random_inputs(0, 1, 8, 8, 12)
    with pytest.raises(ValueError, match="d_state to be a power of two, got 12"):
        ss.selective_scan(**args, backend="pallas")


def test_model_matches_reference_backend(vim_weights_path, vim_io):
    """vim_tiny_d4 through the kernels: logits and every parameter gradient."""
    x = jnp.asarray(vim_io["input_nchw"].transpose(0, 2, 3, 1))
    results = {}
    for backend in ("reference", "pallas"):
        model = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path), scan_backend=backend)
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
        results[backend] = (model(x), jax.grad(loss)(params))
    logits_p, g_p = results["pallas"]
    logits_r, g_r = results["reference"]
    np.testing.assert_allclose(logits_p, vim_io["logits"], atol=1e-4)
    assert np.abs(np.asarray(logits_p) - np.asarray(logits_r)).max() < 1e-5
    flat_p, flat_r = jax.tree.leaves_with_path(g_p), jax.tree.leaves(g_r)
    for (path, gp), gr in zip(flat_p, flat_r):
        assert rel_err(gp, gr) < 1e-4, jax.tree_util.keystr(path)


def test_train_step_lowers_for_cuda(monkeypatch):
    """Vim-Ti train step with backend='pallas' lowered for CUDA on this CPU-only machine:
    Triton calls for the forward and backward scans, and no (B, L, D, N) array anywhere."""
    monkeypatch.setattr(pallas_scan, "INTERPRET", False)
    batch, length, d_inner, d_state = 2, 197, 384, 16
    model = create_model("vim_tiny_patch16_224", scan_backend="pallas")
    model.train()
    step, state = make_train_step(model, optax.adamw(1e-3))
    images = jnp.zeros((batch, 224, 224, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    text = step.trace(state, images, labels).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert any("selective_scan_fwd" in c for c in calls), "no Triton forward scan"
    assert any("selective_scan_bwd" in c for c in calls), "no Triton backward scan"
    # No tensor holds the full states: none has the length, d_inner and d_state axes together.
    for shape in set(re.findall(r"tensor<((?:\d+x)+)[a-z]", text)):
        dims = [int(v) for v in shape.rstrip("x").split("x")]
        assert not ({length, d_inner, d_state} <= set(dims)), f"(B, L, D, N)-like array {dims}"
        assert np.prod(dims) != batch * length * d_inner * d_state, f"(B, L, D, N)-sized array {dims}"
