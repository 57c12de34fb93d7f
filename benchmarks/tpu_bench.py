"""The TPU suite's mixer stages: the Mosaic kernels against the XLA forms on the current device.

    python benchmarks/tpu_bench.py --check [--tiny] [--json F]   # values: kernels vs XLA forms
    python benchmarks/tpu_bench.py --time [--tiny] [--json F]    # times: kernels vs XLA forms

On a TPU, backend="pallas" is the Mosaic kernels (``vim_jax.kernels.selective_scan_tpu``,
``vim_jax.kernels.gla_tpu``). Anywhere else (the suite's rehearsal on a CPU) this script
runs those kernels in Pallas's TPU interpret mode (``tpu_interpret.run_tpu_kernels_on_cpu``:
uninitialised memory reads as NaN, out-of-bounds reads raise), and its times measure the
interpreter: they are printed and recorded marked ``"interpret": true``, never a result.

--check: the selective scan (float32 at Vim-Ti's 384 channels, 197 tokens, reversed; all
eight gradients) and ``bigla`` (float32 at ViG-T's heads, 3 x 32/64, 196 tokens, both
directions in one call; all five gradients) on backend "pallas" against their XLA forms
(the scan's reference backend, the GLA's chunked form), then both in bfloat16 at an odd
length; a NaN input gives a NaN output; exits non-zero on a mismatch.
--time: forward and forward + backward, kernel and XLA form, bfloat16, at the Ti models'
shapes at 224 px (batch 128) and at high resolution (Vim-Ti 1248 px: 6085 tokens, batch 8;
ViG-T 1024 px: 4096 tokens, batch 32), and the kernels' speed-up.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import model_bench  # benchmarks/, beside this script
from scan_bench import inputs as scan_inputs
from scan_bench import rel_err
from vim_jax.mixers import tpu_interpret
from vim_jax.mixers.gla import bigla
from vim_jax.mixers.selective_scan import selective_scan

XLA = {"scan": "reference", "gla": "chunked"}


def gla_inputs(key, b, l, h, dk, dv, dtype):
    """bigla's keyword arguments: q, k, g_fwd, g_bwd (b, l, h, dk), v (b, l, h, dv)."""
    ks = jax.random.split(key, 5)
    q, k = (jax.random.normal(x, (b, l, h, dk), dtype) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, l, h, dv), dtype)
    g_f, g_b = (jax.nn.log_sigmoid(jax.random.normal(x, (b, l, h, dk)) + 2).astype(dtype) for x in ks[3:])
    return dict(q=q, k=k, v=v, g_fwd=g_f, g_bwd=g_b)


def programs(mixer: str, backend: str, reverse: bool = False):
    """(forward, value and gradients of a weighted sum) of one mixer on ``backend``, jitted,
    each taking the dict of inputs."""
    if mixer == "scan":
        run = lambda a: (selective_scan(**a, delta_softplus=True, reverse=reverse, backend=backend),)
    else:
        run = lambda a: bigla(**a, backend=backend)

    def loss(a):
        return sum(jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape)))
                   for o in run(a))

    return jax.jit(run), jax.jit(jax.value_and_grad(loss))


def case_inputs(mixer, shape, dtype, seed=0):
    """A mixer's inputs: shape (b, l, d) for the scan, (b, l, h, dk, dv) for the GLA."""
    key = jax.random.key(seed)
    if mixer == "scan":
        b, l, d = shape
        return scan_inputs(key, b, l, d, dtype=jnp.dtype(dtype))
    return gla_inputs(key, *shape, jnp.dtype(dtype))


def check(tiny: bool, record) -> bool:
    """Both mixers on "pallas" against their XLA forms: outputs and every gradient, and NaN
    propagation; True when every case is within its tolerance."""
    cases = [("scan", (2, 197, 384), "float32", 1e-4), ("gla", (2, 196, 3, 32, 64), "float32", 1e-4),
             ("scan", (3, 70, 40), "bfloat16", 2e-2), ("gla", (3, 70, 2, 16, 32), "bfloat16", 2e-2)]
    if tiny:
        cases = [("scan", (2, 37, 16), "float32", 1e-4), ("gla", (1, 37, 2, 16, 32), "float32", 1e-4),
                 ("scan", (1, 21, 8), "bfloat16", 2e-2), ("gla", (1, 21, 1, 8, 16), "bfloat16", 2e-2)]
    ok = True
    for mixer, shape, dtype, tol in cases:
        a = case_inputs(mixer, shape, dtype)
        got = [fn(a) for fn in programs(mixer, "pallas", reverse=True)]
        want = [fn(a) for fn in programs(mixer, XLA[mixer], reverse=True)]
        errs = {f"out{i}": rel_err(x, y) for i, (x, y) in enumerate(zip(got[0], want[0]))}
        errs.update({f"grad_{k}": rel_err(got[1][1][k], want[1][1][k]) for k in want[1][1]})
        nan = dict(a, **{next(iter(a)): a[next(iter(a))].at[0, 0].set(jnp.nan)})
        errs["NaN in, NaN out"] = 0.0 if bool(jnp.isnan(programs(mixer, "pallas", True)[0](nan)[0]).any()) else 1.0
        worst = max(errs, key=errs.get)
        good = errs[worst] < tol
        ok &= good
        print(f"check {mixer} {shape} {dtype}: worst {worst} rel. error {errs[worst]:.2e} (tolerance {tol:.0e}) "
              f"{'ok' if good else 'FAILED'}", flush=True)
        record(dict(stage="check", mixer=mixer, shape=shape, dtype=dtype, worst=worst, error=errs[worst], ok=good))
    print("correctness:", "OK" if ok else "FAILED", f"(device {jax.devices()[0].device_kind})", flush=True)
    return ok


def timing(tiny: bool, repeats: int, record):
    """Forward and forward + backward times, kernel and XLA form, and the kernels' speed-up."""
    shapes = [("scan", "Vim-Ti 224px", (128, 197, 384)), ("scan", "Vim-Ti 1248px", (8, 6085, 384)),
              ("gla", "ViG-T 224px", (128, 196, 3, 32, 64)), ("gla", "ViG-T 1024px", (32, 4096, 3, 32, 64))]
    if tiny:
        shapes = [("scan", "tiny", (2, 37, 16)), ("gla", "tiny", (1, 37, 2, 16, 32))]
    for mixer, name, shape in shapes:
        a = case_inputs(mixer, shape, "bfloat16")
        times = {}
        for backend in ("pallas", XLA[mixer]):
            for kind, fn in zip(("fwd", "fwd+bwd"), programs(mixer, backend)):
                try:
                    jax.block_until_ready(fn(a))
                    times[backend, kind] = model_bench.timed(fn, a, repeats=repeats)
                except Exception as e:  # e.g. out of memory: reported, the rest goes on
                    print(f"{name} {backend} {kind}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                print(f"{name} {mixer} {backend:9} {kind:8} {times[backend, kind] * 1e3:9.3f} ms", flush=True)
                record(dict(stage="time", mixer=mixer, shape=name, dims=shape, backend=backend, kind=kind,
                            ms=times[backend, kind] * 1e3))
        for kind in ("fwd", "fwd+bwd"):
            if ("pallas", kind) in times and (XLA[mixer], kind) in times:
                print(f"{name} {kind}: the Mosaic kernels {times[XLA[mixer], kind] / times['pallas', kind]:.2f}x "
                      f"the {XLA[mixer]} XLA form's speed", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="values: the kernels against the XLA forms")
    p.add_argument("--time", action="store_true", help="times: the kernels against the XLA forms")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a rehearsal on the CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="append one JSON line per result to this file")
    args = p.parse_args()
    tpu = jax.default_backend() == "tpu"
    if not tpu:
        tpu_interpret.run_tpu_kernels_on_cpu()
        print(f"no TPU ({jax.default_backend()}): the Mosaic kernels run in TPU interpret mode; "
              "times measure the interpreter", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, interpret=not tpu)

    def record(row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(meta, **row), default=str) + "\n")

    ok = check(args.tiny, record) if args.check else True
    if args.time:
        timing(args.tiny, args.repeats, record)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
