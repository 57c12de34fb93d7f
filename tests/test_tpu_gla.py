"""The Mosaic (TPU) GLA kernels in TPU interpret mode against the recurrence, and what a TPU
would run, read from programs lowered for TPU on this CPU host: the kernel each backend
gets, and the Mosaic calls of a ViG train step. The official numbers: tests/test_gla.py
("pallas mosaic")."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import tpu_interpret, vig_gradients_by_remat
from test_selective_scan import rel_err
from test_tpu_scan import lower_for_tpu, mosaic_calls
from vim_jax import create_model
from vim_jax.kernels import gla_tpu
from vim_jax.mixers import gla as mixer
from vim_jax.train.step import make_train_step


def inputs(seed, b, length, heads, dk, dv, directions=2, strength=1.0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(x, (b, length, heads, dk)) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, length, heads, dv))
    g = jax.nn.log_sigmoid(strength * jax.random.normal(ks[3], (b, length, directions, heads, dk)) + 1.0)
    return q, k, v, g, ks[4:]


@pytest.mark.parametrize("length,directions", [(1, (False, True)), (197, (False, True)), (197, (True,)),
                                               (1025, (False, True))])
def test_forward_and_backward_match_the_recurrence(length, directions):
    """The kernels themselves at ViG-T's heads (3 x 32/64), strong gates: outputs, final
    states and all gradients (the final state's cotangent included) equal the recurrence's,
    at lengths below one chunk, off the chunk grid and over several sequence blocks (1025:
    five blocks of 256), one direction or both in one launch. The saved states are one
    lane-dense (dk, heads * dv) tile a chunk of the padded sequence."""
    q, k, v, g, (ko, ks) = inputs(length, 2, length, 3, 32, 64, len(directions), strength=3.0)
    scale = 32 ** -0.5
    o, last, states = gla_tpu.forward(q, k, v, g, scale=scale, directions=directions, save_states=True,
                                      interpret=tpu_interpret())
    ref = lambda *a: mixer._directions(*a, directions, scale, "reference")
    (o_ref, last_ref), vjp = jax.vjp(ref, q, k, v, g)
    padded = -(-length // gla_tpu.seq_block(length)) * gla_tpu.seq_block(length)
    assert states.shape == (2, len(directions), padded // gla_tpu.CHUNK, 32, 3 * 64)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    do, dlast = jax.random.normal(ko, o.shape), jax.random.normal(ks, last.shape)
    got = gla_tpu.backward(q, k, v, g, states, last, do, dlast, scale=scale, directions=directions,
                           interpret=tpu_interpret())
    # Relative to 1 where the gradient is smaller: at length 1 the gate's is exactly 0 (a
    # cancellation of O(10) terms).
    err = lambda a, w: float(jnp.abs(a - w).max() / jnp.maximum(jnp.abs(w).max(), 1.0))
    for name, a, w in zip("qkvg", got, vjp((do, dlast))):
        assert a.shape == w.shape and err(a, w) < 1e-5, name


@pytest.mark.parametrize("heads,dk,dv", [(4, 16, 32), (1, 8, 24), (8, 32, 64)])
def test_other_head_sizes_through_the_mixer(heads, dk, dv, tpu_kernels):
    """ViG-H's head sizes (16/32), sizes off every tile (8/24), and 8 heads of ViG's 32/64
    run as two programs of 4 (``group``: 128 and 256 lanes, as ViG-B's 12 heads run as 3):
    bigla and gla with its final state on backend="pallas" (the Mosaic kernels, TPU
    interpret mode), values and every gradient against the recurrence."""
    assert gla_tpu.group(heads, dk, dv) == (4 if heads == 8 else heads)
    q, k, v, g, (ko, _) = inputs(5, 2, 37, heads, dk, dv)
    ct = jax.random.normal(ko, v.shape)

    def loss(backend, q, k, v, g_f, g_b):
        o_f, o_b = mixer.bigla(q, k, v, g_f, g_b, backend=backend)
        o_last, last = mixer.gla(q, k, v, g_f, return_final_state=True, backend=backend)
        return jnp.sum((o_f + 2 * o_b + o_last) * ct) + jnp.sum(last ** 2)

    args = (q, k, v, g[:, :, 0], g[:, :, 1])
    want = jax.value_and_grad(functools.partial(loss, "reference"), argnums=range(5))(*args)
    got = jax.value_and_grad(functools.partial(loss, "pallas"), argnums=range(5))(*args)
    assert rel_err(got[0], want[0]) < 1e-5
    for name, a, w in zip(("q", "k", "v", "g_fwd", "g_bwd"), got[1], want[1]):
        assert rel_err(a, w) < 1e-5, name
    assert tpu_kernels.count("forward") == 2 and tpu_kernels.count("backward") == 2, tpu_kernels


def test_bfloat16(tpu_kernels):
    """bfloat16 inputs: outputs and gradients in bfloat16 within its rounding of the float32
    recurrence on the same (rounded) inputs; the kernels compute in float32."""
    q, k, v, g, _ = inputs(2, 2, 197, 3, 32, 64)
    args = tuple(x.astype(jnp.bfloat16) for x in (q, k, v, g[:, :, 0], g[:, :, 1]))
    o_f, o_b = mixer.bigla(*args, backend="pallas")
    r_f, r_b = mixer.bigla(*(x.astype(jnp.float32) for x in args), backend="reference")
    assert o_f.dtype == o_b.dtype == jnp.bfloat16
    assert rel_err(o_f.astype(jnp.float32), r_f) < 2 ** -7 and rel_err(o_b.astype(jnp.float32), r_b) < 2 ** -7
    loss = lambda backend, *a: sum(jnp.sum(o.astype(jnp.float32)) for o in mixer.bigla(*a, backend=backend))
    got = jax.grad(lambda *a: loss("pallas", *a), argnums=range(5))(*args)
    want = jax.grad(lambda *a: loss("reference", *a), argnums=range(5))(*(x.astype(jnp.float32) for x in args))
    for name, a, w in zip(("q", "k", "v", "g_fwd", "g_bwd"), got, want):
        assert a.dtype == jnp.bfloat16 and rel_err(a.astype(jnp.float32), w) < 2 ** -6, name
    assert tpu_kernels.count("backward") == 1, tpu_kernels


def _names(lowered) -> list[str]:
    return sorted(name for line in mosaic_calls(lowered) for name in ("gla_fwd_tpu", "gla_bwd_tpu")
                  if name in line)


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_a_program_lowered_for_tpu_runs_the_mosaic_kernels(backend):
    """"auto" and "pallas" lower to the Mosaic kernels for TPU (from this CPU host): one
    forward, and with the gradient one forward and one backward, both directions in each;
    the CPU program holds none."""
    q, k, v, g, _ = inputs(0, 2, 197, 3, 32, 64)
    run = lambda *a: mixer.bigla(*a, backend=backend)
    loss = lambda *a: sum(jnp.sum(o) for o in run(*a))
    args = (q, k, v, g[:, :, 0], g[:, :, 1])
    assert _names(lower_for_tpu(run, *args)) == ["gla_fwd_tpu"]
    assert _names(lower_for_tpu(jax.grad(loss, argnums=range(5)), *args)) == ["gla_bwd_tpu", "gla_fwd_tpu"]
    assert not mosaic_calls(jax.jit(run).lower(*args))


def test_the_tpu_train_step_holds_one_forward_and_one_backward_per_block():
    """A ViG-T train step lowered for TPU: one Mosaic forward and one backward a block (both
    directions in each). Differentiated under remat="mixer", the backward keeps the
    forward's named residuals (one forward a block); under remat="full" it reruns them."""
    x = jnp.zeros((2, 64, 64, 3))
    model = create_model("vig_tiny_patch16_224", depth=2, img_size=64, num_classes=3)
    model.train()
    step, state = make_train_step(model, optax.adamw(1e-3))
    lowered = step.trace(state, x, jnp.zeros((2,), jnp.int32)).lower(lowering_platforms=("tpu",))
    assert _names(lowered) == ["gla_bwd_tpu"] * 2 + ["gla_fwd_tpu"] * 2, _names(lowered)
    counts = {remat: _names(traced.lower(lowering_platforms=("tpu",))).count("gla_fwd_tpu")
              for remat, traced in vig_gradients_by_remat(x).items()}
    assert counts == {"mixer": 2, "full": 4}, counts
