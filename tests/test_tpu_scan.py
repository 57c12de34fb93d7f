"""The Mosaic (TPU) selective-scan kernels, forward and backward, in TPU interpret mode
against the reference backend and the official numbers, and what a TPU would run, read from programs lowered for
TPU on this CPU host (no TPU, no libtpu needed): the kernel each platform gets, and the
Mosaic calls per layer."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import tpu_interpret
from test_pallas_scan import assert_official_fixture, grads
from test_selective_scan import random_inputs, rel_err
from vim_jax import create_model
from vim_jax.kernels import selective_scan_tpu as mosaic
from vim_jax.mixers import selective_scan as ss
from vim_jax.train.step import make_train_step

INTERPRET = tpu_interpret()


def kernel_forward(args, reverse, save_states=True):
    zero = jnp.zeros(args["u"].shape[-1], jnp.float32)
    return mosaic.forward(args["u"], args["delta"], args["z"] if args["z"] is not None else args["u"],
                          args["B"], args["C"], args["A"],
                          zero if args["D"] is None else args["D"],
                          zero if args["delta_bias"] is None else args["delta_bias"],
                          softplus=True, reverse=reverse, has_z=args["z"] is not None, chunk=ss.STATE_CHUNK,
                          save_states=save_states, interpret=INTERPRET)


@pytest.mark.parametrize("length", [1, 197, 1025])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_and_saved_states_match_the_reference(length, reverse):
    """Output, last state and the chunk-entry states (the residual every backend's backward
    reads) equal the reference backend's, at lengths on and off the chunk and sequence-block
    grids, channels off the lane grid (40 of 128)."""
    args = random_inputs(length, 2, length, 40, 16)
    out, last, states = kernel_forward(args, reverse)
    spec = ss._Spec(True, reverse, True, True, True, "reference")
    ref_out, ref_last, ref_states = ss._REFERENCE.forward(
        spec, args["u"], args["delta"], args["z"], args["B"], args["C"], args["A"], args["D"], args["delta_bias"])
    assert states.shape == ref_states.shape == (2, -(-length // ss.STATE_CHUNK), 40, 16)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(last, ref_last) < 1e-5
    assert rel_err(states, ref_states) < 1e-5


@pytest.mark.parametrize("length,reverse,width,opts", [(1, False, 40, {}), (197, True, 40, {}),
                                                       (1025, False, 40, {}), (300, True, 130, {}),
                                                       (197, False, 40, dict(with_z=False))])
def test_backward_from_the_reference_states_matches_the_reference(length, reverse, width, opts):
    """The Mosaic backward reading the states the reference backend saved (any backend's
    backward reads any backend's residual) gives the reference backward's eight gradients,
    the last state's cotangent included: lengths below one chunk, off the block grid and
    over five sequence blocks, channels over two lane blocks (130), no gate."""
    args = random_inputs(length + width, 2, length, width, 16, **opts)
    has_z = args["z"] is not None
    spec = ss._Spec(True, reverse, has_z, True, True, "reference")
    a = (args["u"], args["delta"], args["z"] if has_z else args["u"], args["B"], args["C"], args["A"], args["D"],
         args["delta_bias"])
    out, last, states = ss._REFERENCE.forward(spec, *a)
    g, g_last = jax.random.normal(jax.random.key(3), out.shape), jax.random.normal(jax.random.key(4), last.shape)
    want = ss._REFERENCE.backward(spec, *a, states, g, g_last)
    got = mosaic.backward(*a, states, g, g_last, softplus=True, reverse=reverse, has_z=has_z,
                          chunk=ss.STATE_CHUNK, interpret=INTERPRET)
    names = ("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias")
    for name, x, y in zip(names, got, want):
        if name != "dz" or has_z:
            assert x.shape == y.shape and rel_err(x, y) < 1e-5, name


def test_inference_forward_writes_no_states_and_lanes_past_128():
    """The inference call (no states) at 130 channels: two lane blocks, the second mostly
    padding."""
    args = random_inputs(3, 2, 40, 130, 16)
    out, last, states = kernel_forward(args, reverse=True, save_states=False)
    ref_out, ref_last = ss.selective_scan(**args, delta_softplus=True, reverse=True, return_last_state=True,
                                          backend="reference")
    assert states is None
    assert rel_err(out, ref_out) < 1e-5 and rel_err(last, ref_last) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("opts", [{}, dict(with_z=False, with_d=False, with_bias=False)])
def test_every_gradient_through_the_mosaic_kernels(reverse, opts, tpu_kernels):
    """The custom VJP with the Mosaic forward and backward: outputs and all eight gradients
    equal the reference backend's."""
    args = random_inputs(11, 2, 197, 24, 16, **opts)
    out_p, last_p, g_p = grads(args, "pallas", reverse)
    out_r, last_r, g_r = grads(args, "reference", reverse)
    assert rel_err(out_p, out_r) < 1e-5 and rel_err(last_p, last_r) < 1e-5
    for k in g_r:
        assert rel_err(g_p[k], g_r[k]) < 1e-4, k
    assert {"scan forward", "scan backward"} <= set(tpu_kernels), tpu_kernels


def test_bfloat16(tpu_kernels):
    """bfloat16 inputs: the output within bfloat16 rounding of the float32 reference on the
    same (rounded) inputs; the kernel computes in float32."""
    args = {k: (v.astype(jnp.bfloat16) if v is not None and v.ndim == 3 else v)
            for k, v in random_inputs(5, 2, 197, 40, 16).items()}
    out = ss.selective_scan(**args, delta_softplus=True, backend="pallas")
    ref = ss.selective_scan(**{k: (v.astype(jnp.float32) if v is not None else v) for k, v in args.items()},
                            delta_softplus=True, backend="reference")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 2 ** -7
    assert "scan forward" in tpu_kernels


def test_official_fixture(scan_ref, tpu_kernels):
    """The official CUDA op's numbers: output, last state and every gradient."""
    assert_official_fixture(scan_ref)
    assert {"scan forward", "scan backward"} <= set(tpu_kernels), tpu_kernels


def lower_for_tpu(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))


def mosaic_calls(lowered) -> list[str]:
    return [line for line in lowered.as_text().splitlines() if "tpu_custom_call" in line]


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_a_program_lowered_for_tpu_runs_the_mosaic_kernel(backend):
    """backend "auto" and "pallas" lower to the Mosaic kernel for TPU (from this CPU host),
    and the CPU keeps its default (no Mosaic call in a CPU program)."""
    args = random_inputs(0, 2, 197, 384, 16)
    fn = functools.partial(ss.selective_scan, delta_softplus=True, backend=backend)
    calls = mosaic_calls(lower_for_tpu(lambda a: fn(**a), args))
    assert len(calls) == 1 and "selective_scan_fwd_tpu" in calls[0]
    assert not mosaic_calls(jax.jit(lambda a: fn(**a)).lower(args))


def test_the_tpu_train_step_holds_one_mosaic_forward_and_backward_per_direction_per_layer():
    """Vim's train step lowered for TPU: per layer, two Mosaic forwards (one a direction, the
    states saved once and kept by remat, none rerun for the backward) and two Mosaic
    backwards. The layers are one loop over stacked blocks, so the program holds one layer's
    calls whatever the depth."""
    counts = []
    for depth in (2, 3):
        model = create_model("vim_tiny_patch16_224", img_size=32, depth=depth)
        model.train()
        step, state = make_train_step(model, optax.sgd(0.1))
        images, labels = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
        calls = mosaic_calls(step.trace(state, images, labels).lower(lowering_platforms=("tpu",)))
        counts.append(sorted(name for line in calls for name in ("selective_scan_fwd_tpu", "selective_scan_bwd_tpu")
                             if name in line))
    one_layer = ["selective_scan_bwd_tpu"] * 2 + ["selective_scan_fwd_tpu"] * 2
    assert counts == [one_layer, one_layer], counts
