"""Gated linear attention (vim_jax.gla, vim_jax.mixers.gla.bigla) against the official kernels' numbers
(tests/fixtures/vig/gla_ref.npz): outputs, final states and every gradient, for normal
and harsh gates, on every backend (the Pallas kernels in interpret mode: "pallas" the
Triton kernels', "pallas mosaic" the TPU kernels' in TPU interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path, set_gla_form
from test_selective_scan import rel_err
from vim_jax.mixers.gla import bigla, gla


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(fixture_path("vig/gla_ref.npz")))


def _ours(x):
    """The fixture's (batch, heads, length, dim) -> this project's (batch, length, heads, dim)."""
    return jnp.asarray(x.transpose(0, 2, 1, 3))


@pytest.mark.parametrize("gates", ["", "harsh_"])
@pytest.mark.parametrize("backend", ["reference", "chunked", "pallas", "pallas two-phase", "pallas mosaic"])
def test_matches_the_official_kernels(ref, gates, backend, monkeypatch, request):
    """Harsh gates (cumulative log decay to -65 within a chunk) fail a port that factors
    exp(b_i - b_j) into exp(b_i) * exp(-b_j). "pallas two-phase": the kernels' two-phase form."""
    ran = _kernel_form(monkeypatch, request, backend)
    backend = backend.split()[0]
    q, k, v = (_ours(ref[n]) for n in ("q", "k", "v"))
    g_f, g_b = _ours(ref[gates + "g_f"]), _ours(ref[gates + "g_b"])
    cot_f, cot_b = _ours(ref["cot_f"]), _ours(ref["cot_b"])

    def both(q, k, v, g_f, g_b):
        o_f, s_f = gla(q, k, v, g_f, return_final_state=True, backend=backend)
        o_b, s_b = gla(q, k, v, g_b, reverse=True, return_final_state=True, backend=backend)
        return o_f, o_b, s_f, s_b

    # Compiled, as models run it (XLA's CPU fusions once miscompiled a form of it) and eagerly.
    for o_f, o_b, s_f, s_b in (jax.jit(both)(q, k, v, g_f, g_b), both(q, k, v, g_f, g_b)):
        assert rel_err(o_f, _ours(ref[gates + "o_f"])) < 1e-4
        assert rel_err(o_b, _ours(ref[gates + "o_b"])) < 1e-4
        assert rel_err(s_f, ref[gates + "state_f"]) < 1e-4
        assert rel_err(s_b, ref[gates + "state_b"]) < 1e-4

    def loss(*args):
        o_f, o_b, _, _ = both(*args)
        return jnp.sum(o_f * cot_f) + jnp.sum(o_b * cot_b)

    grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, g_f, g_b)
    for name, got in zip(("q", "k", "v", "g_f", "g_b"), grads):
        assert rel_err(got, _ours(ref[gates + "grad_" + name])) < 1e-4, name
    assert ran is None or len(ran) >= 2, f"the {backend} kernels did not run"


def _kernel_form(monkeypatch, request, backend):
    """Sets up "pallas two-phase" and "pallas mosaic"; returns what records that they ran."""
    if backend == "pallas two-phase":
        return set_gla_form(monkeypatch, True)
    if backend == "pallas mosaic":
        return request.getfixturevalue("tpu_kernels")
    return None


@pytest.mark.parametrize("gates", ["", "harsh_"])
@pytest.mark.parametrize("backend", ["auto", "pallas", "pallas two-phase", "pallas mosaic"])
def test_both_directions_in_one_call(ref, gates, backend, monkeypatch, request):
    """bigla (the model's call) gives the official forward and reverse outputs and their
    gradients, the reverse gates indexed by token as the official model passes them; the
    Pallas kernels run both directions in one launch (either Triton form, and Mosaic)."""
    ran = _kernel_form(monkeypatch, request, backend)
    backend = backend.split()[0]
    q, k, v = (_ours(ref[n]) for n in ("q", "k", "v"))
    g_f, g_b = _ours(ref[gates + "g_f"]), _ours(ref[gates + "g_b"])
    cot_f, cot_b = _ours(ref["cot_f"]), _ours(ref["cot_b"])
    o_f, o_b = jax.jit(functools.partial(bigla, backend=backend))(q, k, v, g_f, g_b)
    assert rel_err(o_f, _ours(ref[gates + "o_f"])) < 1e-4
    assert rel_err(o_b, _ours(ref[gates + "o_b"])) < 1e-4
    assert rel_err((o_f + o_b) / 2, _ours(ref[gates + "o_bid"])) < 1e-4

    def loss(*args):
        o_f, o_b = bigla(*args, backend=backend)
        return jnp.sum(o_f * cot_f) + jnp.sum(o_b * cot_b)

    grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, g_f, g_b)
    for name, got in zip(("q", "k", "v", "g_f", "g_b"), grads):
        assert rel_err(got, _ours(ref[gates + "grad_" + name])) < 1e-4, name
    assert ran is None or len(ran) >= 2, f"the {backend} kernels did not run"


@pytest.mark.parametrize("length", [1, 16, 21])
@pytest.mark.parametrize("reverse", [False, True])
def test_backends_agree_off_the_chunk_grid(length, reverse, monkeypatch, request):
    """Lengths below, at and off one chunk, with strong gates: every backend's outputs, final
    states and gradients (the final state's cotangent included) equal the recurrence's."""
    keys = jax.random.split(jax.random.key(length), 6)
    q, k = (jax.random.normal(x, (2, length, 3, 32)) for x in keys[:2])  # ViG-T's heads
    v = jax.random.normal(keys[2], (2, length, 3, 64))
    g = jax.nn.log_sigmoid(4 * jax.random.normal(keys[3], (2, length, 3, 32)))
    cot_o, cot_s = jax.random.normal(keys[4], v.shape), jax.random.normal(keys[5], (2, 3, 32, 64))
    run = lambda b: lambda *x: gla(*x, reverse=reverse, return_final_state=True, backend=b)

    def grads(b):
        loss = lambda *x: sum(jnp.sum(o * c) for o, c in zip(run(b)(*x), (cot_o, cot_s)))
        return jax.grad(loss, argnums=range(4))(q, k, v, g)

    want, want_grads = run("reference")(q, k, v, g), grads("reference")
    # Errors relative to the arrays' size, or to 1 (the inputs' scale) where smaller: at length
    # 1 the gate gradient is exactly 0, a cancellation of O(10) terms, so 1e-6 there agrees.
    err = lambda a, w: np.abs(np.asarray(a) - np.asarray(w)).max() / max(np.abs(np.asarray(w)).max(), 1.0)
    # Compiled: one chunk (length 16) once met an XLA CPU fusion that read uninitialised memory.
    for b in ("chunked", "pallas", "pallas two-phase", "pallas mosaic"):
        ran = _kernel_form(monkeypatch, request, b)
        for a, w in zip(jax.jit(run(b.split()[0]))(q, k, v, g) + grads(b.split()[0]), want + want_grads):
            assert err(a, w) < 1e-5, b
        assert ran is None or len(ran) >= 2, f"the {b} kernels did not run"


def test_dtypes_and_bad_arguments():
    q = jnp.zeros((1, 5, 2, 16), jnp.bfloat16)
    v = jnp.ones((1, 5, 2, 8), jnp.bfloat16)
    assert gla(q, q, v, q.astype(jnp.float32)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"k has shape \(1, 5, 2, 8\); it must be q's"):
        gla(q, v, v, q)
    with pytest.raises(ValueError, match=r"v has shape \(1, 4, 2, 8\)"):
        gla(q, q, v[:, :4], q)
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        gla(q, q, v, q, backend="triton")
    with pytest.raises(ValueError, match=r"g_bwd has shape \(1, 4, 2, 16\); it must be g_fwd's"):
        bigla(q, q, v, q, q[:, :4])


def test_the_chunked_forms_gradient_keeps_only_chunk_states():
    """The chunked XLA form's custom VJP saves the inputs and the state entering every chunk
    and recomputes each chunk's decays and scores on the way back (JAX's own derivative of
    the scan kept every chunk's (C, C, dk) decays: 70.6 MiB of temporaries here against
    24.0, 26.9 before the walk read chunks in place). Bound: the saved states, plus three
    float32 copies of every input and cotangent (both directions): the padded inputs, the
    gradients of every direction and their sums."""
    b, length, h, dk, dv = 8, 196, 3, 32, 64  # ViG-T's heads at 224 px
    ks = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(x, (b, length, h, dk)) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, length, h, dv))
    g_f, g_b = (jax.nn.log_sigmoid(jax.random.normal(x, (b, length, h, dk))) for x in ks[3:])
    loss = lambda *a: sum(jnp.sum(o ** 2) for o in bigla(*a, backend="chunked"))
    temp = jax.jit(jax.grad(loss, argnums=range(5))).lower(q, k, v, g_f, g_b).compile() \
        .memory_analysis().temp_size_in_bytes
    chunks = -(-length // 16)
    states = chunks * 2 * b * h * dk * dv * 4
    io = 2 * b * length * h * (3 * dk + 2 * dv) * 4  # q, k, g and v, do, for both directions
    assert temp <= states + 3 * io, (temp / 2 ** 20, (states + 3 * io) / 2 ** 20)
