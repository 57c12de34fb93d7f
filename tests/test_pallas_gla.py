"""The Pallas GLA kernels beyond their values (tests/test_gla.py checks those against the official
numbers): what a GPU would run, read from programs lowered for CUDA on this CPU host, the
models on the kernels, remat, block shapes and the Triton IR. The mesh test is in
tests/test_pallas_scan.py, one 8-device process for both mixers' kernels."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import lower_for_cuda, triton_calls, triton_kernels, vig_gradients_by_remat
from test_pallas_scan import _pallas_calls
from test_selective_scan import rel_err
from vim_jax import create_model
from vim_jax.kernels import gla as kernels
from vim_jax.mixers.gla import bigla, gla
from vim_jax.train.step import make_train_step


def _names(text):
    return [re.search(r'name = "(\w+)"', c).group(1) for c in triton_calls(text)]


def _inputs(b=2, length=21, heads=2, dk=16, dv=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k = (jax.random.normal(x, (b, length, heads, dk)) for x in keys[:2])
    v = jax.random.normal(keys[2], (b, length, heads, dv))
    g_f, g_b = (jax.nn.log_sigmoid(jax.random.normal(x, (b, length, heads, dk))) for x in keys[3:])
    return q, k, v, g_f, g_b


def test_vig_train_step_gets_each_platforms_kernels_and_remat_keeps_them():
    """A ViG-T train step (gla_backend "auto", nothing else set) traced once on this CPU host:
    lowered for CUDA, one forward and one backward GLA kernel per block, both directions in
    each; lowered for the CPU, none. Differentiated under remat="mixer" the backward keeps
    the forward kernel's named residuals (as many forward kernels as blocks); under
    remat="full" it reruns them."""
    x = jnp.zeros((2, 64, 64, 3))
    model = create_model("vig_tiny_patch16_224", depth=2, img_size=64, num_classes=3)
    model.train()
    step, state = make_train_step(model, optax.adamw(1e-3))
    traced = step.trace(state, x, jnp.zeros((2,), jnp.int32))
    cuda = _names(lower_for_cuda(traced).as_text())
    assert sorted(cuda) == ["gla_bwd"] * 2 + ["gla_fwd"] * 2, cuda
    assert not triton_calls(traced.lower(lowering_platforms=("cpu",)).as_text())

    counts = {remat: _names(lower_for_cuda(traced).as_text()).count("gla_fwd")
              for remat, traced in vig_gradients_by_remat(x).items()}
    assert counts == {"mixer": 2, "full": 4}, counts


def test_models_on_the_kernels_match_the_xla_form():
    """ViG and ViG-H with gla_backend="pallas" (interpret mode here): the logits and
    gradients of the chunked XLA form, on the train path."""
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    for name, kw in (("vig_tiny_patch16_224", dict(depth=1)),
                     ("vig_h_tiny_224", dict(depths=(1,), dims=32, num_heads=(1,)))):
        out = {}
        for backend in ("chunked", "pallas"):
            model = create_model(name, img_size=64, num_classes=3, gla_backend=backend, **kw)
            model.train()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)
            out[backend] = jax.jit(jax.value_and_grad(loss))(params)
        for a, b in zip(jax.tree.leaves(out["pallas"]), jax.tree.leaves(out["chunked"])):
            assert rel_err(a, b) < 1e-4, name


def test_no_block_overhangs_and_no_nan_dropping_min_or_max():
    """At a length off the chunk grid (21) and below one chunk (5): every block of every
    launch, forward and backward, divides its array (Triton would not mask an overhang);
    and the kernels' Triton IR has no minnumf/maxnumf (they return the other operand for a
    NaN)."""
    for length in (21, 5):
        args = _inputs(length=length)
        loss = lambda *a: sum(jnp.sum(o) for o in bigla(*a, backend="pallas"))
        grad = jax.grad(loss, argnums=range(5))
        calls = list(_pallas_calls(jax.make_jaxpr(grad)(*args).jaxpr))
        assert sorted(e.params["name"] for e in calls) == ["gla_bwd", "gla_fwd"]
        for eqn in calls:
            for bm in eqn.params["grid_mapping"].block_mappings:
                block = [getattr(dim, "block_size", 1) for dim in bm.block_shape]
                assert all(n % k == 0 for n, k in zip(bm.array_aval.shape, block)), \
                    (eqn.params["name"], bm.origin, block, bm.array_aval.shape)
    ir = triton_kernels(lower_for_cuda(jax.jit(grad).trace(*_inputs())))
    assert set(ir) == {"gla_fwd", "gla_bwd"}, set(ir)
    for name, text in ir.items():
        for op in ("minnumf", "maxnumf"):
            assert op not in text, (name, op)


def test_backends_per_platform_and_any_head_size():
    """backend="pallas" lowered for ROCm (no kernel there) is an error naming the platform and
    what to use; "auto" lowers there with the XLA form (TPU's kernels: tests/test_tpu_gla.py). Head sizes that are no power of two >= 16 run on
    the kernels too, zero-padded to their tiles: "auto" lowered for CUDA holds the Triton
    calls, and "pallas" (interpret mode here) matches the recurrence."""
    q, k, v, g_f, _ = _inputs()
    for backend in ("pallas", "auto"):
        traced = jax.jit(lambda *a: gla(*a, backend=backend)).trace(q, k, v, g_f)
        if backend == "pallas":
            with pytest.raises(NotImplementedError, match="gla.*no kernel for platform rocm.*backend='auto'"):
                traced.lower(lowering_platforms=("rocm",))
        else:
            assert not triton_calls(traced.lower(lowering_platforms=("rocm",)).as_text())
    small = [x[..., :8] for x in (q, k, v, g_f)]
    assert kernels.block_size(8) == 16 and kernels.block_size(60) == 64 and kernels.block_size(64) == 64
    call, = triton_calls(lower_for_cuda(jax.jit(lambda *a: gla(*a)).trace(*small)).as_text())
    # The kernel reads q, k, v and the gates padded to its 16-wide tiles.
    assert re.findall(r"tensor<([0-9x]+)xf32>", call)[:4] == ["2x21x2x16"] * 3 + ["2x21x1x2x16"]
    np.testing.assert_allclose(gla(*small, backend="pallas"), gla(*small, backend="reference"), atol=1e-5)


@pytest.mark.parametrize("dk,dv", [(60, 100), (100, 60), (8, 320)])
def test_any_head_size_matches_the_recurrence_with_gradients(dk, dv, gla_form):
    """flash-linear-attention's test grid takes head sizes that are not powers of two; so do
    the kernels (interpret mode): both directions' outputs, the final state and every
    gradient against the recurrence, at an odd length."""
    q, k, v, g_f, g_b = _inputs(b=1, length=19, heads=1, dk=dk, dv=dv, seed=3)
    ct = jax.random.normal(jax.random.key(9), v.shape)

    def loss(backend, q, k, v, g_f, g_b):
        o_f, o_b = bigla(q, k, v, g_f, g_b, backend=backend)
        o_last, last = gla(q, k, v, g_f, return_final_state=True, backend=backend)
        return jnp.sum((o_f + 2 * o_b + o_last) * ct) + jnp.sum(last ** 2)

    want = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3, 4))(q, k, v, g_f, g_b)
    got = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2, 3, 4))(q, k, v, g_f, g_b)
    assert float(loss("pallas", q, k, v, g_f, g_b)) == pytest.approx(float(loss("reference", q, k, v, g_f, g_b)),
                                                                      rel=1e-5)
    for name, a, b in zip(("q", "k", "v", "g_fwd", "g_bwd"), got, want):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("length,directions", [(5, (False, True)), (37, (False, True)), (21, (True,))])
def test_the_two_phase_forward_equals_the_one_walk(length, directions):
    """``Config(two_phase=True)``: the chunks' entry states by one walk, then every chunk's
    outputs in parallel. Outputs, final states and the saved chunk states equal the one-walk
    forward's (interpret mode), so either backward reads them; lowered for CUDA it is two
    Triton kernels, the second with a program per (batch, head, direction x chunk)."""
    q, k, v, g_f, g_b = _inputs(b=2, length=length, heads=2, seed=5)
    g = jnp.stack([g_f, g_b], 2) if len(directions) == 2 else g_b[:, :, None]

    def fwd(two_phase, interpret=True):
        cfg = kernels.Config(8, 1, two_phase)
        return lambda *a: kernels.forward(*a, scale=0.25, directions=directions, save_states=True,
                                          interpret=interpret, config=cfg)

    for got, want in zip(fwd(True)(q, k, v, g), fwd(False)(q, k, v, g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    text = lower_for_cuda(jax.jit(fwd(True, interpret=False)).trace(q, k, v, g)).as_text()
    assert _names(text) == ["gla_fwd_states", "gla_fwd_outputs"]
    chunks = -(-max(length, kernels.CHUNK) // kernels.CHUNK)
    outputs_call = triton_calls(text)[1]
    assert re.search(rf"grid_x = 2 : i32, grid_y = 2 : i32, grid_z = {len(directions) * chunks} : i32", outputs_call)


@pytest.mark.parametrize("length,directions", [(5, (False, True)), (37, (False, True)), (21, (True,)),
                                               (48, (False,))])
def test_the_two_phase_backward_equals_the_one_walk(length, directions):
    """``Config(two_phase=True)`` backward: the adjoint of the state leaving every chunk by one
    walk back, then every chunk's gradients in parallel, dg's sums over later chunks added
    outside. dq, dk, dv and dg equal the one-walk backward's (interpret mode), below, on and
    off the chunk grid; lowered for CUDA it is two Triton kernels, the second with a program
    per (batch, head, direction x chunk)."""
    q, k, v, g_f, g_b = _inputs(b=2, length=length, heads=2, seed=7)
    g = jnp.stack([g_f, g_b], 2) if len(directions) == 2 else g_b[:, :, None]
    one = kernels.Config(8, 1)
    _, last, states = kernels.forward(q, k, v, g, scale=0.25, directions=directions, save_states=True,
                                      interpret=True, config=one)
    keys = jax.random.split(jax.random.key(11), 2)
    do = jax.random.normal(keys[0], (2, length, len(directions), 2, v.shape[-1]))
    dlast = jax.random.normal(keys[1], last.shape)

    def bwd(two_phase, interpret=True):
        return lambda *a: kernels.backward(*a, scale=0.25, directions=directions, interpret=interpret,
                                           config=kernels.Config(8, 1, two_phase))

    args = (q, k, v, g, states, last, do, dlast)
    for name, got, want in zip(("dq", "dk", "dv", "dg"), bwd(True)(*args), bwd(False)(*args)):
        assert rel_err(got, want) < 1e-5, name
    text = lower_for_cuda(jax.jit(bwd(True, interpret=False)).trace(*args)).as_text()
    assert _names(text) == ["gla_bwd_states", "gla_bwd_chunks"]
    chunks = -(-max(length, kernels.CHUNK) // kernels.CHUNK)
    assert re.search(rf"grid_x = 2 : i32, grid_y = 2 : i32, grid_z = {len(directions) * chunks} : i32",
                     triton_calls(text)[1])
