"""Gated-linear-attention benchmark: the Pallas kernels against the chunked XLA form.

    python benchmarks/gla_bench.py [--check] [--tiny] [--json F] [--tuned-out F]

--check: on the current device (interpret mode off a GPU), both directions in one call
(``bigla``) with the Pallas backend against the chunked XLA form: outputs and the five
gradients, float32 at ViG-T's heads (dk 32, dv 64) and 196 tokens, bfloat16 at ViG-H's
(16, 32) and an odd length; exits non-zero on a mismatch.
Then, unless --check alone is asked for by --no-timing: forward and forward + backward
times of both, at ViG-T's shapes for 224 px (batch 128, 196 tokens) and 1024 px (batch 32,
4096 tokens), and the speed-up; and the two forms of the Pallas kernels side by side,
forward and backward (called directly, both directions a launch): the one walk (the
default) and the two-phase one (``Config.two_phase``: a walk for the chunks' entry states,
or backward their adjoints, then every chunk in parallel), whose results --check also
compares; with --tuned-out, the faster of each (when their results agree) is written there
for the GPU suite's later stages. --tiny: small shapes, for a rehearsal on the CPU.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import model_bench  # benchmarks/, beside this script
from vim_jax.kernels import gla as kernels
from vim_jax.kernels import tuning
from vim_jax.mixers.gla import bigla


def inputs(b, l, h, dk, dv, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(x, (b, l, h, dk), dtype) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, l, h, dv), dtype)
    gf, gb = (jax.nn.log_sigmoid(jax.random.normal(x, (b, l, h, dk))) / 16 for x in ks[3:5])
    cot = jax.random.normal(ks[5], (2, b, l, h, dv))
    return (q, k, v, gf, gb), cot


def fns(backend, cot):
    fwd = jax.jit(lambda *a: bigla(*a, backend=backend))

    def loss(*a):
        o_f, o_b = bigla(*a, backend=backend)
        return jnp.sum(o_f.astype(jnp.float32) * cot[0]) + jnp.sum(o_b.astype(jnp.float32) * cot[1])

    return fwd, jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def kernel_calls(args, cot, two_phase: bool, interpret: bool):
    """Both directions of the Pallas forward and of its backward called directly, one walk
    or two phases: {"fwd": (jitted fn, its arguments), "bwd": ...}."""
    q, k, v, gf, gb = args
    dk, dv = q.shape[-1], v.shape[-1]
    g = jnp.stack([gf, gb], 2)
    flags = dict(scale=dk ** -0.5, directions=(False, True), interpret=interpret)
    cfg = lambda kind: kernels.default_config(dk, dv, kind)._replace(two_phase=two_phase)
    fwd = jax.jit(lambda *a: kernels.forward(*a, save_states=False, config=cfg("fwd"), **flags)[0])
    _, last, states = jax.jit(lambda *a: kernels.forward(*a, save_states=True, config=cfg("fwd"), **flags))(
        q, k, v, g)
    bwd = jax.jit(lambda *a: kernels.backward(*a, config=cfg("bwd"), **flags))
    do = jnp.moveaxis(cot, 0, 2).astype(q.dtype)  # (b, L, directions, h, dv)
    return {"fwd": (fwd, (q, k, v, g)), "bwd": (bwd, (q, k, v, g, states, last, do, jnp.ones_like(last)))}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def check(tiny: bool) -> bool:
    ok = True
    shapes = [(2, 196, 3, 32, 64, jnp.float32, 1e-4), (3, 70, 2, 16, 32, jnp.bfloat16, 2e-2)]
    if tiny:
        shapes = [(1, 37, 2, 16, 32, jnp.float32, 1e-4)]
    with jax.default_matmul_precision("highest"):
        for b, l, h, dk, dv, dtype, tol in shapes:
            args, cot = inputs(b, l, h, dk, dv, dtype)
            got = [fns("pallas", cot)[i](*args) for i in (0, 1)]
            want = [fns("chunked", cot)[i](*args) for i in (0, 1)]
            errs = {"o_f": rel_err(got[0][0], want[0][0]), "o_b": rel_err(got[0][1], want[0][1])}
            errs.update({f"grad_{n}": rel_err(x, y) for n, x, y in zip(("q", "k", "v", "g_f", "g_b"),
                                                                       got[1][1], want[1][1])})
            interpret = jax.devices()[0].platform != "gpu"
            one, two = (kernel_calls(args, cot, x, interpret) for x in (False, True))
            for kind in ("fwd", "bwd"):  # the two-phase kernels against the one-walk ones
                results = [jax.tree.leaves(calls[kind][0](*calls[kind][1])) for calls in (two, one)]
                errs[f"{kind} two-phase"] = max(rel_err(a, b_) for a, b_ in zip(*results))
            worst = max(errs, key=errs.get)
            good = errs[worst] < tol
            ok &= good
            print(f"check b={b} L={l} h={h} dk={dk} dv={dv} {jnp.dtype(dtype).name}: worst {worst} rel. error "
                  f"{errs[worst]:.2e} (tolerance {tol:.0e}) {'ok' if good else 'FAILED'}", flush=True)
    print("correctness:", "OK" if ok else "FAILED", f"(device {jax.devices()[0].device_kind})", flush=True)
    return ok


def timing(tiny: bool, repeats: int, record, tuned_out: str | None = None):
    """Pallas against the chunked XLA form, forward and training; then the kernels, forward
    and backward, as one walk and as two phases, the faster of each (if their results
    agree) written to ``tuned_out`` as its configuration at that shape (``kernels.gla.TUNED``)."""
    shapes = [("ViG-T 224px", 128, 196), ("ViG-T 1024px", 32, 4096)] if not tiny else [("tiny", 2, 37)]
    winners = {}
    for name, b, l in shapes:
        args, cot = inputs(b, l, 3, 32, 64, jnp.bfloat16 if not tiny else jnp.float32)
        times = {}
        for backend in ("pallas", "chunked"):
            fwd, grad = fns(backend, cot)
            for kind, fn in (("fwd", fwd), ("fwd+bwd", grad)):
                try:
                    jax.block_until_ready(fn(*args))
                    times[backend, kind] = model_bench.timed(fn, *args, repeats=repeats)
                except Exception as e:  # e.g. out of memory: reported, the rest goes on
                    print(f"{name} {backend} {kind}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                print(f"{name} b={b} L={l} {backend:8} {kind:8} {times[backend, kind] * 1e3:9.3f} ms", flush=True)
                record(dict(shape=name, batch=b, length=l, backend=backend, kind=kind,
                            ms=times[backend, kind] * 1e3, device=jax.devices()[0].device_kind))
        for kind in ("fwd", "fwd+bwd"):
            if ("pallas", kind) in times and ("chunked", kind) in times:
                print(f"{name} {kind}: Pallas {times['chunked', kind] / times['pallas', kind]:.2f}x the chunked "
                      "XLA form's speed", flush=True)
        interpret = jax.devices()[0].platform != "gpu"
        # The kernels as one walk and as two phases, forward and backward: each form's results
        # must agree with the other's (bfloat16 rounding) before the faster can win.
        forms = {two_phase: kernel_calls(args, cot, two_phase, interpret) for two_phase in (False, True)}
        for kind in ("fwd", "bwd"):
            results, kernel_times = {}, {}
            for two_phase, calls in forms.items():
                label = "pallas two-phase" if two_phase else "pallas one walk"
                fn, fn_args = calls[kind]
                try:
                    results[two_phase] = jax.block_until_ready(fn(*fn_args))
                    kernel_times[two_phase] = model_bench.timed(fn, *fn_args, repeats=repeats)
                except Exception as e:
                    print(f"{name} {label} kernel {kind}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                print(f"{name} b={b} L={l} {label:16} kernel {kind} {kernel_times[two_phase] * 1e3:9.3f} ms",
                      flush=True)
                record(dict(shape=name, batch=b, length=l, backend=label, kind="kernel " + kind,
                            ms=kernel_times[two_phase] * 1e3, device=jax.devices()[0].device_kind))
            if len(kernel_times) < 2:
                continue
            one, two = (jax.tree.leaves(results[x]) for x in (False, True))
            same = max(rel_err(a, b_) for a, b_ in zip(two, one)) < 2 ** -7
            two_phase = same and kernel_times[True] < kernel_times[False]
            winners[(kind, 32, 64, l)] = kernels.default_config(32, 64, kind)._replace(two_phase=two_phase)
            print(f"{name} kernel {kind}: two-phase {kernel_times[False] / kernel_times[True]:.2f}x the one walk's "
                  f"speed; winner: {'two-phase' if two_phase else 'one walk'}"
                  + ("" if same else " (the two forms' results differ: two-phase not eligible)"), flush=True)
            if tuned_out:
                tuning.save(tuned_out, winners)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="append one JSON line per timing to this file")
    p.add_argument("--tuned-out", help="write the kernels' winners at each shape here (for $VIM_JAX_GLA_TUNED)")
    args = p.parse_args()

    def record(row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    ok = check(args.tiny) if args.check else True
    if not args.no_timing:
        timing(args.tiny, args.repeats, record, args.tuned_out)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
