"""Gated-linear-attention benchmark: the Pallas kernels against the chunked XLA form.

    python benchmarks/gla_bench.py [--check] [--tiny] [--json F]

--check: on the current device (interpret mode off a GPU), both directions in one call
(``bigla``) with the Pallas backend against the chunked XLA form: outputs and the five
gradients, float32 at ViG-T's heads (dk 32, dv 64) and 196 tokens, bfloat16 at ViG-H's
(16, 32) and an odd length; exits non-zero on a mismatch.
Then, unless --check alone is asked for by --no-timing: forward and forward + backward
times of both, at ViG-T's shapes for 224 px (batch 128, 196 tokens) and 1024 px (batch 32,
4096 tokens), and the speed-up; and the two Pallas forwards side by side (the kernels
called directly, both directions a launch): the one walk that writes the outputs too (the
default) and the two-phase one (``Config.two_phase``: a walk for the chunks' entry states,
then every chunk's outputs in parallel), whose outputs --check also compares. --tiny:
small shapes, for a rehearsal on the CPU.
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


def kernel_forward(two_phase: bool, interpret: bool):
    """Both directions of the Pallas forward called directly, one launch or two phases."""
    def fwd(q, k, v, gf, gb):
        dk = q.shape[-1]
        cfg = kernels.default_config(dk, v.shape[-1], "fwd")._replace(two_phase=two_phase)
        return kernels.forward(q, k, v, jnp.stack([gf, gb], 2), scale=dk ** -0.5, directions=(False, True),
                               save_states=False, interpret=interpret, config=cfg)[0]
    return jax.jit(fwd)


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
            errs["o two-phase"] = rel_err(kernel_forward(True, interpret)(*args),
                                          kernel_forward(False, interpret)(*args))
            worst = max(errs, key=errs.get)
            good = errs[worst] < tol
            ok &= good
            print(f"check b={b} L={l} h={h} dk={dk} dv={dv} {jnp.dtype(dtype).name}: worst {worst} rel. error "
                  f"{errs[worst]:.2e} (tolerance {tol:.0e}) {'ok' if good else 'FAILED'}", flush=True)
    print("correctness:", "OK" if ok else "FAILED", f"(device {jax.devices()[0].device_kind})", flush=True)
    return ok


def timing(tiny: bool, repeats: int, record, tuned_out: str | None = None):
    """Pallas against the chunked XLA form, forward and training; then the kernel forward as
    one walk and as two phases, the faster (if their outputs agree) written to ``tuned_out``
    as the forward's configuration at that shape (``kernels.gla.TUNED``)."""
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
        outputs = {}
        for two_phase in (False, True):
            label = "pallas two-phase" if two_phase else "pallas one walk"
            fn = kernel_forward(two_phase, interpret)
            try:
                outputs[label] = jax.block_until_ready(fn(*args))
                times[label] = model_bench.timed(fn, *args, repeats=repeats)
            except Exception as e:
                print(f"{name} {label} fwd: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"{name} b={b} L={l} {label:16} kernel fwd {times[label] * 1e3:9.3f} ms", flush=True)
            record(dict(shape=name, batch=b, length=l, backend=label, kind="kernel fwd",
                        ms=times[label] * 1e3, device=jax.devices()[0].device_kind))
        if "pallas one walk" in times and "pallas two-phase" in times:
            print(f"{name} kernel fwd: two-phase {times['pallas one walk'] / times['pallas two-phase']:.2f}x "
                  "the one walk's speed", flush=True)
            # The two forwards compute the same sums in other orders: the faster one wins only
            # if their outputs agree (bfloat16 rounding).
            same = rel_err(outputs["pallas two-phase"], outputs["pallas one walk"]) < 2 ** -7
            two_phase = same and times["pallas two-phase"] < times["pallas one walk"]
            cfg = kernels.default_config(32, 64, "fwd")._replace(two_phase=two_phase)
            winners[("fwd", 32, 64, l)] = cfg
            print(f"winner {name} kernel fwd: {'two-phase' if two_phase else 'one walk'}"
                  + ("" if same else " (the two-phase output differs from the one walk's: not eligible)"), flush=True)
            if tuned_out:
                tuning.save(tuned_out, winners)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="append one JSON line per timing to this file")
    p.add_argument("--tuned-out", help="write the forward's winner at each shape here (for $VIM_JAX_GLA_TUNED)")
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
