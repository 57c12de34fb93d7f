"""Selective-scan benchmark: correctness of the kernels, their speed against the memory
roofline, and a sweep that retunes their launch parameters.

    python benchmarks/scan_bench.py --check          # anywhere (interpret mode off a GPU)
    python benchmarks/scan_bench.py [--json F]       # a GPU: timings, GB/s, % of HBM peak
    python benchmarks/scan_bench.py --sweep [--json F]  # a GPU: time every launch candidate

--check compares the Pallas kernels with the reference backend on the current device: the
output and all eight gradients, at Vim-Ti's width and an odd one, float32 (matmul precision
"highest") and bfloat16.

The scan is memory-bound. Bytes moved per call (what must cross HBM at least once):
  forward (inference)  u, delta, z, B, C in and out    = 4*B*L*D + 2*B*L*N elements
  forward (training)   + the chunk states written      + 4 * B*(L/T)*D*N bytes
  backward             u, delta, z, g, B, C, states in; du, ddelta, dz out; dB/dC partials
Achieved GB/s = those bytes / time, printed with the device's HBM peak.
--sweep times every (channel block, warps, stages) candidate for the forward and backward
kernel at each shape and prints the winners as entries for ``TUNED`` in
vim_jax/kernels/selective_scan.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import model_bench  # benchmarks/, beside this script
from vim_jax import scan as ss

# Peak HBM bandwidth in GB/s by device kind (vendor data sheets).
HBM_GBPS = {"NVIDIA H100 80GB HBM3": 3350, "H100 80GB HBM3": 3350, "NVIDIA H100 PCIe": 2000,
            "NVIDIA H200": 4800, "H200": 4800, "NVIDIA A100-SXM4-80GB": 2039,
            "NVIDIA A100-SXM4-40GB": 1555}

# (model, d_inner, batch, length): ImageNet at 224 px, and 1248 px at small batch.
SHAPES = [("Vim-Ti", 384, 64, 197), ("Vim-S", 768, 64, 197), ("Vim-B", 1536, 64, 197),
          ("Vim-Ti", 384, 8, 6085), ("Vim-S", 768, 8, 6085), ("Vim-B", 1536, 8, 6085)]
D_STATE = 16


def inputs(key, b, l, d, n=D_STATE, dtype=jnp.bfloat16):
    k = jax.random.split(key, 8)
    return dict(u=jax.random.normal(k[0], (b, l, d), dtype),
                delta=(jax.random.normal(k[1], (b, l, d)) - 2).astype(dtype),
                A=-jnp.exp(jax.random.normal(k[2], (d, n))), B=jax.random.normal(k[3], (b, l, n), dtype),
                C=jax.random.normal(k[4], (b, l, n), dtype), D=jnp.ones((d,)),
                z=jax.random.normal(k[5], (b, l, d), dtype), delta_bias=0.1 * jax.random.normal(k[6], (d,)))


def kernel_args(a):
    return (a["u"], a["delta"], a["z"], a["B"], a["C"], a["A"], a["D"], a["delta_bias"])


def traffic(kind, b, l, d, itemsize, n=D_STATE, chunk=ss.STATE_CHUNK):
    """Bytes a kernel must move at least once (see the module docstring); the backward's
    dB/dC partials counted at the default channel block."""
    from vim_jax.kernels.selective_scan import config_for

    seq, bc, states = b * l * d * itemsize, b * l * n * itemsize, b * -(-l // chunk) * d * n * 4
    if kind == "fwd":
        return 4 * seq + 2 * bc
    if kind == "fwd_train":
        return 4 * seq + 2 * bc + states
    blocks = -(-d // config_for("bwd", b, l, d, chunk).block_d)
    return 7 * seq + 2 * bc + states + 2 * blocks * b * l * n * 4  # bwd


def timed(fn, *args, repeats=10):
    """Median seconds of ``repeats`` calls after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    return model_bench.timed(fn, *args, repeats=repeats)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check() -> bool:
    """Kernels vs the reference: out and all eight gradients, two widths, two dtypes."""
    ok = True
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for (b, l, d, reverse), dtype in itertools.product(
            [(2, 197, 384, False), (2, 197, 384, True), (3, 70, 40, True)], ("float32", "bfloat16")):
        args = inputs(jax.random.key(b + l + d), b, l, d, dtype=jnp.dtype(dtype))
        cot = jax.random.normal(jax.random.key(1), (b, l, d))
        res = {}
        for backend in ("reference", "pallas"):
            def loss(a):
                y = ss.selective_scan(**a, delta_softplus=True, reverse=reverse, backend=backend)
                return jnp.sum(y.astype(jnp.float32) * cot), y
            with jax.default_matmul_precision("highest"):
                res[backend] = jax.jit(jax.grad(loss, has_aux=True))(args)
        (g_p, y_p), (g_r, y_r) = res["pallas"], res["reference"]
        # float32: both compute in float32 (1e-4); bfloat16 inputs and outputs: 2^-7.
        tol = 1e-4 if dtype == "float32" else 2 ** -7
        errs = {"out": rel_err(y_p, y_r), **{f"grad_{k}": rel_err(g_p[k], g_r[k]) for k in names}}
        worst = max(errs, key=errs.get)
        good = errs[worst] < tol
        ok &= good
        print(f"check b={b} L={l} d={d} reverse={reverse} {dtype}: worst {worst} rel. error "
              f"{errs[worst]:.2e} (tolerance {tol:.1e}) {'ok' if good else 'FAILED'}", flush=True)
    print("correctness:", "OK" if ok else "FAILED", f"(device {jax.devices()[0].device_kind})")
    return ok


def _kernel_fns(shape_args, cfg_fwd=None, cfg_bwd=None):
    """Jitted forward (inference), forward (training) and backward kernel calls."""
    from vim_jax.kernels import selective_scan as k

    static = dict(softplus=True, reverse=False, has_z=True, chunk=ss.STATE_CHUNK, interpret=False)
    fwd = jax.jit(lambda *a: k.forward(*a, save_states=False, config=cfg_fwd, **static)[0])
    fwd_train = jax.jit(lambda *a: k.forward(*a, save_states=True, config=cfg_fwd, **static))
    out, last, states = fwd_train(*shape_args)
    bwd = jax.jit(lambda *a: k.backward(*a, config=cfg_bwd, **static))
    return fwd, fwd_train, bwd, (*shape_args, states, out, last)


def bench(repeats, record):
    dev = jax.devices()[0]
    peak = HBM_GBPS.get(dev.device_kind)
    print(f"device: {dev.device_kind}; HBM peak {peak or 'unknown'} GB/s; jax {jax.__version__}")
    print(f"{'model':7} {'batch':>5} {'L':>5} {'dtype':9} {'kernel':10} {'ms':>9} {'GB/s':>7} {'%peak':>6}")
    for (model, d, b, l), dtype in itertools.product(SHAPES, ("bfloat16", "float32")):
        a = inputs(jax.random.key(0), b, l, d, dtype=jnp.dtype(dtype))
        isz = jnp.dtype(dtype).itemsize
        try:
            fwd, fwd_train, bwd, bwd_args = _kernel_fns(kernel_args(a))
            ref = jax.jit(functools.partial(ss.selective_scan, delta_softplus=True, backend="reference"))
            times = {"fwd": timed(fwd, *kernel_args(a), repeats=repeats),
                     "fwd_train": timed(fwd_train, *kernel_args(a), repeats=repeats),
                     "bwd": timed(bwd, *bwd_args, repeats=repeats),
                     "reference_fwd": timed(lambda: ref(**a), repeats=repeats)}
        except Exception as e:  # out of memory at the largest shapes, most often
            print(f"{model:7} {b:5d} {l:5d} {dtype:9} failed: {type(e).__name__} {str(e)[:100]}", flush=True)
            record(dict(model=model, d_inner=d, batch=b, length=l, dtype=dtype, status=str(e)[:200]))
            continue
        for kind, t in times.items():
            nbytes = traffic(kind.removeprefix("reference_"), b, l, d, isz)
            gbps = nbytes / t / 1e9
            pct = 100 * gbps / peak if peak else float("nan")
            print(f"{model:7} {b:5d} {l:5d} {dtype:9} {kind:10} {t * 1e3:9.3f} {gbps:7.0f} {pct:5.1f}%",
                  flush=True)
            record(dict(model=model, d_inner=d, batch=b, length=l, dtype=dtype, kernel=kind, ms=t * 1e3,
                        bytes=nbytes, gbps=gbps, pct_peak=pct, status="ok"))


def candidates(kind, b, l, d):
    """Launch parameters to try: channel block, warps, stages, and for the forward at small
    batch the number of sequence segments."""
    from vim_jax.kernels import selective_scan as k
    from vim_jax.kernels.selective_scan import Config

    segs = (1,)
    if kind == "fwd" and b * d // 32 < 512:
        segs = tuple(s for s in (1, 2, 4, 8, 16, 32) if s * 4 * ss.STATE_CHUNK <= l)
    # num_stages stays 1: Triton pipelines only loads that feed a dot, which these lack.
    default = k.default_config(b, l, d, ss.STATE_CHUNK, kind)
    yield default
    # Only configurations that benchmarks/gpu_compile.py found free of spills.
    for bd, warps, seg in itertools.product((16, 32, 64), (4, 8, 2, 1), segs):
        cfg = Config(bd, warps, 1, seg)
        if bd <= d and k.spill_free(kind, cfg, D_STATE) and cfg != default:
            yield cfg


def sweep(repeats, record, budget):
    """Times the candidates of each shape and kernel, the default first, for an equal share
    of ``budget`` seconds; prints the winners found as ``TUNED`` entries."""
    from vim_jax.kernels import selective_scan as k

    share = budget / (2 * len(SHAPES))
    winners = {}
    static = dict(softplus=True, reverse=False, has_z=True, chunk=ss.STATE_CHUNK, interpret=False)
    for model, d, b, l in SHAPES:
        a = kernel_args(inputs(jax.random.key(0), b, l, d))
        _, _, _, bwd_args = _kernel_fns(a)
        for kind in ("fwd", "bwd"):
            best, deadline = None, time.perf_counter() + share
            for cfg in candidates(kind, b, l, d):
                if time.perf_counter() > deadline:
                    break
                if kind == "fwd":
                    fn = jax.jit(lambda *x, cfg=cfg: k.forward(*x, save_states=False, config=cfg, **static)[0])
                    fn_args = a
                else:
                    fn = jax.jit(lambda *x, cfg=cfg: k.backward(*x, config=cfg, **static))
                    fn_args = bwd_args
                try:
                    t = timed(fn, *fn_args, repeats=repeats)
                except Exception as e:
                    print(f"{kind} {model} b={b} L={l} {cfg}: failed {type(e).__name__} {str(e)[:80]}",
                          flush=True)
                    continue
                record(dict(model=model, d_inner=d, batch=b, length=l, kernel=kind, config=cfg._asdict(),
                            ms=t * 1e3))
                print(f"{kind} {model} b={b} L={l} {cfg}: {t * 1e3:.3f} ms", flush=True)
                if best is None or t < best[1]:
                    best = (cfg, t)
            if best:
                print(f"winner {kind} {model} b={b} L={l}: {best[0]} {best[1] * 1e3:.3f} ms "
                      f"(default {k.default_config(b, l, d, ss.STATE_CHUNK, kind)})", flush=True)
                winners[(kind, d, b, l)] = best[0]
    print("TUNED = {")
    for key, cfg in winners.items():
        print(f"    {key!r}: Config{tuple(cfg)!r},")
    print("}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness only")
    p.add_argument("--sweep", action="store_true", help="time the launch candidates (GPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=600, help="--sweep: stop after this many seconds")
    p.add_argument("--json", help="append one JSON object per measurement to this file")
    args = p.parse_args()

    def record(row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    if args.check or jax.default_backend() != "gpu":
        ok = check()
        if not args.check:
            print("no GPU: timings skipped (they would measure interpret mode)")
        raise SystemExit(0 if ok else 1)
    if args.sweep:
        sweep(args.repeats, record, args.budget)
    else:
        bench(args.repeats, record)


if __name__ == "__main__":
    main()
