"""Pallas selective-scan kernels in interpret mode against the reference backend and the
official numbers; what a GPU would run, read from programs lowered for CUDA on this CPU
host (no GPU needed): the kernel each platform gets, kernel counts, block shapes."""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import example, given, settings, strategies as st

from vim_jax.kernels import selective_scan as pallas_scan
from conftest import NO_GPU_INFO, lower_for_cuda, triton_calls
from test_selective_scan import NAMES, channels_last, random_inputs, rel_err
from vim_jax import create_model
from vim_jax.mixers import selective_scan as ss
from vim_jax.mixers.platform import lowered_only_for
from vim_jax.train.step import make_train_step


ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_official_fixture(scan_ref, scan_layout):
    assert_official_fixture(scan_ref)


def assert_official_fixture(scan_ref):
    """backend="pallas" gives the official op's output, last state and every gradient."""
    args = channels_last(scan_ref)
    cot = jnp.asarray(scan_ref["cotangent"].transpose(0, 2, 1))
    out, last = ss.selective_scan(**args, delta_softplus=True, return_last_state=True, backend="pallas")
    assert rel_err(out, scan_ref["out"].transpose(0, 2, 1)) < 1e-4
    assert rel_err(last, scan_ref["last_state"]) < 1e-4
    g = jax.grad(lambda a: jnp.sum(ss.selective_scan(**a, delta_softplus=True, backend="pallas") * cot))(args)
    for k in NAMES:
        got = np.asarray(g[k])
        assert rel_err(got.transpose(0, 2, 1) if got.ndim == 3 else got, scan_ref[f"grad_{k}"]) < 1e-4, k


_SLOW = pytest.mark.slow  # CI budget: about 20 s a case; CI keeps a long and a short length


@pytest.mark.parametrize("l,d,reverse", [  # lengths past a chunk; channel tails
    (197, 48, False), (197, 48, True), (37, 40, False), pytest.param(37, 40, True, marks=_SLOW),
    pytest.param(70, 24, False, marks=_SLOW), pytest.param(70, 24, True, marks=_SLOW)])
def test_odd_lengths_and_widths(l, d, reverse, scan_layout):
    assert_same_as_reference(random_inputs(l + d, 2, l, d, 16), reverse)


@pytest.mark.parametrize("opts", [dict(with_z=False), dict(with_d=False, with_bias=False),
                                  dict(with_d=False, with_z=False, with_bias=False)])
def test_optional_inputs(opts, scan_layout):
    assert_same_as_reference(random_inputs(5, 2, 21, 16, 8, **opts), reverse=True)


# Each example compiles a new program (~15 s): marked slow. The layout is drawn with the
# shape, and each layout has one pinned example (a partial chunk, odd widths), so both run
# every time at 8 compilations rather than 12.
@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 80), d=st.integers(1, 70),
       log_n=st.integers(0, 4), reverse=st.booleans(), seed=st.integers(0, 2**16),
       layout=st.sampled_from(["tile", "lanes"]))
@example(b=2, l=45, d=33, log_n=3, reverse=True, seed=1, layout="tile")
@example(b=1, l=53, d=41, log_n=4, reverse=False, seed=2, layout="lanes")
def test_random_shapes(b, l, d, log_n, reverse, seed, layout):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIM_JAX_SCAN_LAYOUT", layout)
        assert_same_as_reference(random_inputs(seed, b, l, d, 2 ** log_n), reverse)


def test_bfloat16_inputs(scan_layout):
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


def _no_bldn_array(text, batch, length, d_inner, d_state):
    """No tensor holds the full states: none has the length, d_inner and d_state axes
    together, or their product's size."""
    for shape in set(re.findall(r"tensor<((?:\d+x)+)[a-z]", text)):
        dims = [int(v) for v in shape.rstrip("x").split("x")]
        assert not ({length, d_inner, d_state} <= set(dims)), f"(B, L, D, N)-like array {dims}"
        assert np.prod(dims) != batch * length * d_inner * d_state, f"(B, L, D, N)-sized array {dims}"


def test_one_traced_train_step_gets_each_platforms_kernels():
    """The Vim-Ti train step (backend "auto", no flag or global touched) traced once on this
    CPU host. Lowered for CUDA: Triton calls for the forward and backward scans, none of the
    CPU tricks (polynomial exp, projection VJP barrier) and no (B, L, D, N) array. Lowered
    for the CPU: no Triton call, and the CPU tricks."""
    batch, length, d_inner, d_state = 2, 197, 384, 16
    model = create_model("vim_tiny_patch16_224")
    model.train()
    step, state = make_train_step(model, optax.adamw(1e-3))
    traced = step.trace(state, jnp.zeros((batch, 224, 224, 3)), jnp.zeros((batch,), jnp.int32))
    cuda = lower_for_cuda(traced).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    calls = triton_calls(cuda)
    assert any("selective_scan_fwd" in c for c in calls), "no Triton forward scan"
    assert any("selective_scan_bwd" in c for c in calls), "no Triton backward scan"
    for cpu_trick in ("optimization_barrier", "bitcast_convert"):
        assert cpu_trick not in cuda and cpu_trick in cpu, cpu_trick
    assert not triton_calls(cpu)
    _no_bldn_array(cuda, batch, length, d_inner, d_state)


def _kernel_counts(text):
    calls = triton_calls(text)
    return (sum("selective_scan_fwd" in c for c in calls),
            sum("selective_scan_bwd" in c for c in calls))


def test_no_forward_kernel_runs_twice():
    """Under remat="mixer" the backward keeps the forward kernels' named residuals (the chunk
    states): the gradient holds as many forward kernels as the forward, one per direction
    in the scanned layer body. remat="full" reruns them, which the count sees."""
    x = jnp.zeros((2, 32, 32, 3))
    counts = {}
    for remat in ("mixer", "full"):
        model = create_model("vim_tiny_patch16_224", depth=2, img_size=32, num_classes=3,
                             scan_backend="pallas", remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        logits = lambda p: nnx.merge(graphdef, p, rest, copy=True)(x)
        loss = lambda p: jnp.sum(logits(p) ** 2)
        counts[remat] = (_kernel_counts(lower_for_cuda(jax.jit(logits).trace(params)).as_text()),
                         _kernel_counts(lower_for_cuda(jax.jit(jax.grad(loss)).trace(params)).as_text()))
    assert counts["mixer"] == ((2, 0), (2, 2)), counts
    assert counts["full"] == ((2, 0), (4, 2)), counts


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _pallas_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _pallas_calls(sub)


@pytest.mark.parametrize("b,l,d", [(2, 37, 40), (1, 21, 24), (3, 70, 37), (2, 33, 384), (1, 150, 40)])
def test_no_block_overhangs_its_array(b, l, d, scan_layout):
    """Triton does not mask a block that overhangs its array (interpret mode pads and hides
    it): in every kernel launched, forward (one pass, or segments side by side as at
    b=1, L=150) and backward, each block dimension divides its array's dimension, at
    widths that are not multiples of the channel block."""
    from vim_jax.mixers import selective_scan as ss_mod

    args = random_inputs(d, b, l, d, 16)
    order = ("u", "delta", "z", "B", "C", "A", "D", "delta_bias")
    flat = [args[k] for k in order]
    static = dict(softplus=True, reverse=True, has_z=True, chunk=ss_mod.STATE_CHUNK, interpret=False)

    def fwd_bwd(*a):
        out, last, states = pallas_scan.forward(*a, save_states=True, **static)
        return pallas_scan.backward(*a, states, out, last, **static)

    calls = list(_pallas_calls(jax.make_jaxpr(fwd_bwd)(*flat).jaxpr))
    segments = pallas_scan.config_for("fwd", b, l, d, ss_mod.STATE_CHUNK).segments
    assert len(calls) == (2 if segments == 1 else 3), (segments, len(calls))
    for eqn in calls:
        for bm in eqn.params["grid_mapping"].block_mappings:
            block = [getattr(dim, "block_size", 1) for dim in bm.block_shape]
            assert all(n % k == 0 for n, k in zip(bm.array_aval.shape, block)), \
                (eqn.params["name"], bm.origin, block, bm.array_aval.shape)


def test_pallas_backend_on_a_platform_without_kernels_is_an_error():
    """backend="pallas" lowered for ROCm (no kernel there) raises an error naming the
    platform and what to use instead; "auto" lowers there with the reference scan."""
    args = random_inputs(0, 1, 8, 8, 16)
    for backend in ("pallas", "auto"):
        traced = jax.jit(lambda a: ss.selective_scan(**a, backend=backend)).trace(args)
        if backend == "pallas":
            with pytest.raises(NotImplementedError, match="no kernel for platform rocm.*backend='auto'"):
                traced.lower(lowering_platforms=("rocm",))
        else:
            text = traced.lower(lowering_platforms=("rocm",)).as_text()
            assert "xla.gpu.triton" not in text and "tpu_custom_call" not in text


def test_export_for_cpu_and_cuda_runs_on_the_cpu():
    """One jax.export of the Vim-Ti forward for ("cpu", "cuda"): the artifact carries the
    Triton kernels for CUDA, and its CPU half reproduces the model's logits."""
    from jax import export
    from vim_jax.export import export_model

    model = create_model("vim_tiny_patch16_224")
    x = jax.random.normal(jax.random.key(0), (1, 224, 224, 3))
    exp = export_model(model, batch=1, img_size=224, platforms=("cpu", "cuda"))
    assert exp.platforms == ("cpu", "cuda")
    assert "xla.gpu.triton" in exp.mlir_module()
    restored = export.deserialize(exp.serialize())
    np.testing.assert_allclose(restored.call(x), model(x), atol=1e-5, rtol=1e-5)


_MESH_SCRIPT = textwrap.dedent("""
    import functools, json, re, sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from conftest import lower_for_cuda, triton_calls
    from test_selective_scan import random_inputs, rel_err
    from vim_jax import create_model
    from vim_jax.parallel import sharding as shd
    from vim_jax.mixers import selective_scan as ss
    from vim_jax.mixers.gla import bigla
    from vim_jax.train.step import TrainState, train_step_fn

    assert jax.device_count() == 8
    mesh = shd.make_mesh()
    out = {}

    def batch_dims(text):
        dims = set()
        for call in triton_calls(text):
            for shape in re.findall(r"tensor<((?:\\d+x)+)[a-z]", call):
                dims.update(int(v) for v in shape.rstrip("x").split("x"))
        return dims

    # The scan alone: batch 24 over 8 devices, values and gradients against one device.
    args = random_inputs(1, 24, 37, 40, 16)
    batched = {k: v is not None and v.ndim == 3 for k, v in args.items()}
    sh = {k: NamedSharding(mesh, P("data") if b else P()) for k, b in batched.items()}
    def loss(a, backend):
        y, last = ss.selective_scan(**a, delta_softplus=True, reverse=True, return_last_state=True,
                                    backend=backend)
        return jnp.sum(y ** 2) + jnp.sum(last), y

    for backend in ("pallas", "reference"):
        grad = jax.value_and_grad(functools.partial(loss, backend=backend), has_aux=True)
        one = jax.jit(grad)(args)
        eight = shd.jit_on_mesh(mesh, grad, in_shardings=(sh,))(jax.device_put(args, sh))
        out[backend] = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)))
    with jax.set_mesh(mesh):
        traced = jax.jit(jax.grad(lambda a: loss(a, "pallas")[0]), in_shardings=(sh,)).trace(args)
    dims = batch_dims(lower_for_cuda(traced, mesh).as_text())
    out["scan_dims"] = sorted(dims)

    # The GLA kernels (both directions in one launch) the same way: batch 24, 70 tokens.
    ks = jax.random.split(jax.random.key(2), 5)
    gla_args = [jax.random.normal(ks[i], (24, 70, 2, 32 if i == 2 else 16)) for i in range(3)]
    gla_args += [jax.nn.log_sigmoid(jax.random.normal(ks[i], (24, 70, 2, 16))) for i in (3, 4)]
    gsh = NamedSharding(mesh, P("data"))
    gla_loss = lambda *a: sum(jnp.sum(o ** 2) for o in bigla(*a, backend="pallas"))
    gla_grad = jax.value_and_grad(gla_loss, argnums=range(5))
    one = jax.jit(gla_grad)(*gla_args)
    eight = shd.jit_on_mesh(mesh, gla_grad, in_shardings=(gsh,) * 5)(*jax.device_put(gla_args, gsh))
    out["gla"] = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)))
    with jax.set_mesh(mesh):
        traced = jax.jit(jax.grad(gla_loss, argnums=range(5)), in_shardings=(gsh,) * 5).trace(*gla_args)
    text = lower_for_cuda(traced, mesh).as_text()
    out["gla_dims"] = sorted(batch_dims(text))
    out["gla_calls"] = len(triton_calls(text))

    # The trainer's step, data parallel and FSDP: every kernel on the per-device batch.
    for fsdp in (False, True):
        model = create_model("vim_tiny_patch16_224", img_size=32, depth=2, num_classes=5,
                             scan_backend="pallas")
        model.train()
        step, state = train_step_fn(model, optax.adamw(1e-3))
        shs = TrainState(NamedSharding(mesh, P()), *(shd.state_shardings(t, mesh, fsdp, min_size=1024)
                                                     for t in state[1:]))
        bs = shd.batch_sharding(mesh)
        with jax.set_mesh(mesh):
            traced = jax.jit(step, in_shardings=(shs, bs, bs)).trace(
                state, jax.ShapeDtypeStruct((40, 32, 32, 3), jnp.float32),
                jax.ShapeDtypeStruct((40,), jnp.int32))
        text = lower_for_cuda(traced, mesh).as_text()
        out["fsdp" if fsdp else "dp"] = dict(dims=sorted(batch_dims(text)),
                                             calls=len(triton_calls(text)))
    print(json.dumps(out))
""")


@pytest.mark.parametrize("kernels", ["timed", "new"])
def test_kernels_run_per_device_under_a_mesh(kernels, tmp_path):
    """8 simulated CPU devices with the trainer's mesh: the sharded scan (Pallas in
    interpret mode, and the reference) equals one device, values and gradients; lowered
    for CUDA, every Triton call takes the per-device batch (24 / 8 = 3, 40 / 8 = 5), never
    the global one, for the scan alone and for the data-parallel and FSDP train steps; the
    GLA kernels the same way (values, gradients, per-device batch 3 of 24). "timed": the
    kernels a GPU has timed (the scan's tile layout, GLA's one walk); "new": the lanes scan
    and the two-phase GLA kernels, chosen as a GPU suite's winners files choose them."""
    from vim_jax.kernels import gla, tuning

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    if kernels == "new":
        tuning.save(str(tmp_path / "gla.json"), {(kind, 16, 32, 70): gla.default_config(16, 32, kind)._replace(
            two_phase=True) for kind in ("fwd", "bwd")})
        env.update(VIM_JAX_SCAN_LAYOUT="lanes", VIM_JAX_GLA_TUNED=str(tmp_path / "gla.json"))
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    if NO_GPU_INFO in r.stderr:
        pytest.skip(f"this jax cannot lower Pallas Triton kernels on a CPU host: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pallas"] < 1e-5 and out["reference"] < 1e-5, out
    assert 3 in out["scan_dims"] and 24 not in out["scan_dims"], out["scan_dims"]
    assert out["gla"] < 1e-5 and out["gla_calls"] == (2 if kernels == "timed" else 4), out
    assert 3 in out["gla_dims"] and 24 not in out["gla_dims"], out["gla_dims"]
    for name in ("dp", "fsdp"):
        assert out[name]["calls"] >= 2 and 5 in out[name]["dims"] and 40 not in out[name]["dims"], out


@pytest.mark.parametrize("segments", [2, 5])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("base", [pallas_scan.Config(16, 4, 1), pallas_scan.Config(32, 1, 1, layout="lanes")])
def test_segmented_forward_equals_one_pass(segments, reverse, base):
    """Small batches scan long sequences as segments side by side: output, last state and
    the saved chunk states equal the one-pass kernel's, in either direction, with a last
    segment shorter than the others, in either layout."""
    args = random_inputs(3, 1, 150, 24, 16)
    flat = [args[k] for k in ("u", "delta", "z", "B", "C", "A", "D", "delta_bias")]
    static = dict(softplus=True, reverse=reverse, has_z=True, chunk=16, save_states=True, interpret=True)
    one = pallas_scan.forward(*flat, config=base, **static)
    seg = pallas_scan.forward(*flat, config=base._replace(segments=segments), **static)
    for a, b in zip(seg, one):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_vmap_of_the_scan(backend):
    """jax.vmap over a stack of scans (every platform's kernel is traced, the Triton one
    too) equals the scans one by one; lowered for CUDA it still holds the Triton kernel."""
    stack = [random_inputs(s, 2, 21, 16, 8) for s in (1, 2)]
    args = jax.tree.map(lambda *x: jnp.stack(x), *stack)
    f = lambda a: ss.selective_scan(**a, delta_softplus=True, backend=backend)
    got = jax.vmap(f)(args)
    for i, a in enumerate(stack):
        assert rel_err(got[i], f(a)) < 1e-6
    assert triton_calls(lower_for_cuda(jax.jit(jax.vmap(f)).trace(args)).as_text())


class _KernelPrimitiveOnThisHost:
    """A backend whose stages go through the kernel primitive for this host's platform, as
    the Triton kernels do on a GPU: an eager call here takes the GPU's eager path."""

    def __getattr__(self, stage):
        platform = jax.default_backend()
        impl = getattr(ss._REFERENCE, stage)
        return lambda spec, *args: lowered_only_for(platform, functools.partial(impl, spec), *args,
                                                    op="selective_scan")


def test_eager_call_binds_the_kernel_primitive(monkeypatch):
    """Un-jitted, platform_dependent runs the chosen branch eagerly and binds the kernel
    primitive: it has an evaluation rule, for the scan and for its gradient."""
    monkeypatch.setitem(ss._BACKENDS, "auto", {jax.default_backend(): _KernelPrimitiveOnThisHost(),
                                               "default": ss._REFERENCE})
    args = random_inputs(3, 2, 21, 8, 4)
    out, g = jax.value_and_grad(lambda u: ss.selective_scan(**{**args, "u": u}, delta_softplus=True)
                                .sum())(args["u"])
    with jax.disable_jit():
        out_nojit = ss.selective_scan(**args, delta_softplus=True)
    ref, g_ref = jax.value_and_grad(lambda u: ss.selective_scan(
        **{**args, "u": u}, delta_softplus=True, backend="reference").sum())(args["u"])
    assert rel_err(out, ref) < 1e-5 and rel_err(g, g_ref) < 1e-5
    assert rel_err(out_nojit.sum(), ref) < 1e-5


@pytest.mark.parametrize("backend,layout", [("reference", None), ("pallas", "tile"), ("pallas", "lanes")])
@pytest.mark.parametrize("name", ["delta", "u", "B", "delta_bias"])
def test_nan_in_gives_nan_out(backend, layout, name, monkeypatch):
    """A NaN in any input reaches the output and the gradients (no NaN-dropping clamp)."""
    if layout:
        monkeypatch.setenv("VIM_JAX_SCAN_LAYOUT", layout)
    args = random_inputs(4, 1, 20, 8, 4)
    bad = np.array(args[name])
    bad[(0, 5, 3)[-bad.ndim:]] = np.nan
    args[name] = jnp.asarray(bad)
    out, _, g = grads(args, backend, reverse=False)
    assert np.isnan(np.asarray(out)).any(), name
    assert np.isnan(np.asarray(g["A"])).any(), name  # the states the NaN reaches


def test_lowered_kernels_use_no_nan_dropping_min_or_max(scan_layout):
    """Triton's minnumf/maxnumf return the other operand for a NaN; the kernels must use none."""
    from conftest import triton_kernels

    args = random_inputs(5, 2, 40, 32, 16)
    loss = lambda u, delta: ss.selective_scan(**{**args, "u": u, "delta": delta},
                                              delta_softplus=True).sum()
    kernels = triton_kernels(lower_for_cuda(jax.jit(jax.grad(loss, (0, 1))).trace(args["u"], args["delta"])))
    assert set(kernels) == {"selective_scan_fwd", "selective_scan_bwd"}, set(kernels)
    for name, ir_text in kernels.items():
        for op in ("minnumf", "maxnumf"):
            assert op not in ir_text, (name, op)


@pytest.mark.parametrize("reverse", [False, True])
def test_saved_states_mean_the_same_on_both_backends(reverse, scan_layout):
    """The forward's saved states are position-aligned chunk entries on every backend, so a
    backward on one backend from the other's residual gives the same gradients (a program
    exported for several platforms, or remat that reruns the forward elsewhere)."""
    args = random_inputs(6, 2, 37, 8, 4)  # 37: a partial chunk, first in step order when reversed
    spec = ss._Spec(True, reverse, True, True, True, "auto")
    ins = (args["u"], args["delta"], args["z"], args["B"], args["C"], args["A"], args["D"], args["delta_bias"])
    pallas = ss._Pallas(interpret=True)
    out_r, last_r, states_r = ss._REFERENCE.forward(spec, *ins)
    out_p, last_p, states_p = pallas.forward(spec, *ins)
    assert rel_err(states_p, states_r) < 1e-5 and rel_err(out_p, out_r) < 1e-5
    cot = (jax.random.normal(jax.random.key(1), out_r.shape), jax.random.normal(jax.random.key(2), last_r.shape))
    g_ref = ss._REFERENCE.backward(spec, *ins, states_r, *cot)
    g_mixed = pallas.backward(spec, *ins, states_r, *cot)
    for name, a, b in zip(("u", "delta", "z", "B", "C", "A", "D", "delta_bias"), g_mixed, g_ref):
        assert rel_err(a, b) < 1e-4, name


def test_lanes_kernels_state_their_instructions_and_sum_in_registers():
    """Lowered for CUDA, the lanes kernels hold no cross-thread reduction (the forward sums
    over states in registers; the backward's sums over channels are its own shuffles) and
    state the PTX they mean: fused multiply-adds, flush-to-zero exp2 and, backward,
    butterfly shuffles. The tile kernels reduce across threads and state none of it."""
    from conftest import triton_kernels

    args = random_inputs(5, 2, 40, 32, 16)
    loss = lambda u: ss.selective_scan(**{**args, "u": u}, delta_softplus=True).sum()
    ir = {}
    for layout in ("tile", "lanes"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VIM_JAX_SCAN_LAYOUT", layout)
            ir[layout] = triton_kernels(lower_for_cuda(jax.jit(jax.grad(loss)).trace(args["u"])))
    for name in ("selective_scan_fwd", "selective_scan_bwd"):
        lanes, tile = ir["lanes"][name], ir["tile"][name]
        assert "tt.reduce" not in lanes and "tt.reduce" in tile, name
        for asm in ("fma.rn.f32", "ex2.approx.ftz.f32"):
            assert asm in lanes and asm not in tile, (name, asm)
    assert "shfl.sync.bfly.b32" in ir["lanes"]["selective_scan_bwd"]


@pytest.mark.parametrize("kernel,cfg,match", [
    ("bwd", pallas_scan.Config(32, 1, 1, layout="rows"), "layout='rows' is not one of"),
    ("bwd", pallas_scan.Config(64, 1, 1, layout="lanes"), "lanes backward runs one warp of 32 channels"),
    ("fwd", pallas_scan.Config(16, 1, 1, layout="lanes"), "must be a multiple of 32"),
    ("fwd", pallas_scan.Config(48, 1, 1), "must be powers of two"),
])
def test_a_launch_configuration_a_kernel_cannot_run_is_refused(kernel, cfg, match):
    with pytest.raises(ValueError, match=match):
        pallas_scan.check_config(kernel, cfg)


def test_the_layout_variable_is_checked(monkeypatch):
    monkeypatch.setenv("VIM_JAX_SCAN_LAYOUT", "fast")
    with pytest.raises(ValueError, match="VIM_JAX_SCAN_LAYOUT='fast' is not one of"):
        pallas_scan.config_for("fwd", 2, 197, 384, 16)
