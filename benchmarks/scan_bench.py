"""Selective-scan benchmark: correctness of the kernels, their speed against the memory
roofline, and a sweep that retunes their launch parameters.

    python benchmarks/scan_bench.py --check [--ptxas]   # anywhere (interpret mode off a GPU)
    python benchmarks/scan_bench.py [--json F]          # a GPU: timings, GB/s, % of HBM peak
    python benchmarks/scan_bench.py --sweep [--tuned-out F]  # a GPU: time the launch candidates
    (--tiny: the same at tiny shapes, for a rehearsal on the CPU)

--check compares the Pallas kernels with the reference backend on the current device: the
output and all eight gradients, segmented float32 at Vim-Ti's width reversed and bfloat16
at an odd size (matmul precision "highest"); an eager (un-jitted) scan and gradient; a NaN
in delta reaching the output. With --ptxas, on a GPU, ptxas -v of the kernels this GPU's
own XLA compiled (compare with benchmarks/gpu_compile.py's table).

The scan is memory-bound. Bytes moved per call (what must cross HBM at least once):
  forward (inference)  u, delta, z, B, C in and out    = 4*B*L*D + 2*B*L*N elements
  forward (training)   + the chunk states written      + 4 * B*(L/T)*D*N bytes
  backward             u, delta, z, g, B, C, states in; du, ddelta, dz out; dB/dC partials
                       written, then read back by their sum over channel blocks
Achieved GB/s = those bytes / time, printed with the device's HBM peak.
--sweep times the spill-free (channel block, warps, segments, layout) candidates, the
measured default first and the new "lanes" layout's default second, for the forward and
backward kernels at the shapes the GPU suite's later stages run; a candidate is timed only
once its result matches the reference's (bfloat16 rounding); it prints each winner as
found and rewrites --tuned-out (the file $VIM_JAX_SCAN_TUNED names for them).
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
from vim_jax.mixers import selective_scan as ss
from vim_jax.kernels import tuning
from vim_jax.kernels.selective_scan import config_for

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
    seq, bc, states = b * l * d * itemsize, b * l * n * itemsize, b * -(-l // chunk) * d * n * 4
    if kind == "fwd":
        return 4 * seq + 2 * bc
    if kind == "fwd_train":
        return 4 * seq + 2 * bc + states
    blocks = -(-d // config_for("bwd", b, l, d, chunk).block_d)
    # dB and dC as float32 per-block partials: written by the kernel, read back by their sum.
    return 7 * seq + 2 * bc + states + 2 * 2 * blocks * b * l * n * 4  # bwd


def timed(fn, *args, repeats=10):
    """Median seconds of ``repeats`` calls after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    return model_bench.timed(fn, *args, repeats=repeats)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(tiny: bool = False, ptxas_dir: str | None = None) -> bool:
    """Kernels vs the reference (out and all eight gradients), in both layouts of the
    state; an eager call, NaN in -> NaN out."""
    import os

    ok = True
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    cases = [((2, 197, 384, True), "float32"), ((3, 70, 40, False), "bfloat16")]
    if tiny:
        cases = [((2, 37, 16, True), "float32"), ((1, 21, 8, False), "bfloat16")]
    saved_layout = os.environ.get("VIM_JAX_SCAN_LAYOUT")
    for ((b, l, d, reverse), dtype), layout in itertools.product(cases, ("tile", "lanes")):
        os.environ["VIM_JAX_SCAN_LAYOUT"] = layout  # read where each call picks its configuration
        args = inputs(jax.random.key(b + l + d), b, l, d, dtype=jnp.dtype(dtype))
        cot = jax.random.normal(jax.random.key(1), (b, l, d))
        res = {}
        for backend in ("reference", "pallas"):
            def loss(a):
                y = ss.selective_scan(**a, delta_softplus=True, reverse=reverse, backend=backend)
                return jnp.sum(y.astype(jnp.float32) * cot), y
            with jax.default_matmul_precision("highest"):
                grad = jax.jit(jax.grad(loss, has_aux=True))
                if ptxas_dir and backend == "pallas":  # the one compilation, its PTX kept
                    grad = grad.lower(args).compile(compiler_options={"xla_dump_to": ptxas_dir})
                res[backend] = grad(args)
        (g_p, y_p), (g_r, y_r) = res["pallas"], res["reference"]
        # float32: both compute in float32 (1e-4); bfloat16 inputs and outputs: 2^-7.
        tol = 1e-4 if dtype == "float32" else 2 ** -7
        errs = {"out": rel_err(y_p, y_r), **{f"grad_{k}": rel_err(g_p[k], g_r[k]) for k in names}}
        worst = max(errs, key=errs.get)
        good = errs[worst] < tol
        ok &= good
        cfg = config_for("fwd", b, l, d, ss.STATE_CHUNK)
        print(f"check b={b} L={l} d={d} reverse={reverse} {dtype} ({cfg.layout}, {cfg.segments} segments): worst "
              f"{worst} rel. error {errs[worst]:.2e} (tolerance {tol:.1e}) {'ok' if good else 'FAILED'}",
              flush=True)

    if saved_layout is None:
        os.environ.pop("VIM_JAX_SCAN_LAYOUT")
    else:
        os.environ["VIM_JAX_SCAN_LAYOUT"] = saved_layout
    # Segmented (4 segments, a partial chunk), as a small batch of a long sequence runs.
    args = inputs(jax.random.key(3), 1, 300, 16, dtype=jnp.float32)
    eager = ss.selective_scan(**args, delta_softplus=True, backend="pallas")  # no jit
    g_eager = jax.grad(lambda u: ss.selective_scan(**{**args, "u": u}, delta_softplus=True,
                                                   backend="pallas").sum())(args["u"])
    ref = ss.selective_scan(**args, delta_softplus=True, backend="reference")
    g_ref = jax.grad(lambda u: ss.selective_scan(**{**args, "u": u}, delta_softplus=True,
                                                 backend="reference").sum())(args["u"])
    good = max(rel_err(eager, ref), rel_err(g_eager, g_ref)) < 1e-4
    ok &= good
    print(f"eager call and gradient: {'ok' if good else 'FAILED'}", flush=True)

    args["delta"] = args["delta"].at[0, 5, 3].set(jnp.nan)
    out = jax.jit(lambda a: ss.selective_scan(**a, delta_softplus=True, backend="pallas"))(args)
    good = bool(jnp.isnan(out[0, 5:, 3]).all()) and not bool(jnp.isnan(out[0, :, 4]).any())
    ok &= good
    print(f"NaN in delta reaches the output: {'ok' if good else 'FAILED'}", flush=True)

    if ptxas_dir:  # a report only: its failure does not fail the check
        import pathlib
        import gpu_compile  # benchmarks/, beside this script

        try:
            arch = gpu_compile.ptxas_arch(jax.devices()[0].compute_capability)
            for name, (regs, spill, loop) in sorted(gpu_compile.ptxas_report(
                    gpu_compile.find_ptxas(), arch, pathlib.Path(ptxas_dir), gpu_compile.find_nvdisasm()).items()):
                print(f"ptxas -arch={arch} (this GPU's XLA): {name}: {regs} registers, {spill} spill bytes"
                      + (f"; step loop {loop}" if loop else ""), flush=True)
        except (Exception, SystemExit) as e:
            print(f"ptxas report skipped: {type(e).__name__}: {e}", flush=True)
    print("correctness:", "OK" if ok else "FAILED", f"(device {jax.devices()[0].device_kind})")
    return ok


def _kernel_fns(shape_args, cfg_fwd=None, cfg_bwd=None, interpret=False):
    """Jitted forward (inference), forward (training) and backward kernel calls."""
    from vim_jax.kernels import selective_scan as k

    static = dict(softplus=True, reverse=False, has_z=True, chunk=ss.STATE_CHUNK, interpret=interpret)
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
    """Launch parameters to try, the measured default first and the new layout's default
    second (old against new), then the rest of both layouts: channel block, warps,
    stages, for the forward at small batch the number of sequence segments, and the
    state's layout."""
    from vim_jax.kernels import selective_scan as k
    from vim_jax.kernels.selective_scan import Config

    segs = (1,)
    if kind == "fwd" and b * d // 32 < 512:
        segs = tuple(s for s in (1, 2, 4, 8, 16, 32) if s * 4 * ss.STATE_CHUNK <= l)
    # num_stages stays 1: Triton pipelines only loads that feed a dot, which these lack.
    firsts = [k.default_config(b, l, d, ss.STATE_CHUNK, kind, layout) for layout in ("tile", "lanes")]
    yield from firsts
    # Only configurations that benchmarks/gpu_compile.py found free of spills.
    for layout, bd, warps, seg in itertools.product(("lanes", "tile"), (16, 32, 64, 128), (4, 8, 2, 1), segs):
        cfg = Config(bd, warps, 1, seg, layout)
        if bd <= max(d, 32) and k.spill_free(kind, cfg, D_STATE) and cfg not in firsts:
            yield cfg


# What the GPU suite's later stages run: (model, d_inner, batch, length, kernels). The model
# stage (Vim-Ti, batch 128, forward and training step), the efficiency stage (Vim-Ti
# inference at 512 and 1248 px, batch 32).
SWEEP_SHAPES = [("Vim-Ti", 384, 128, 197, ("fwd", "bwd")), ("Vim-Ti", 384, 32, 6085, ("fwd",)),
                ("Vim-Ti", 384, 32, 1025, ("fwd",))]
TINY_SWEEP_SHAPES = [("tiny", 16, 2, 37, ("fwd", "bwd"))]


def sweep(repeats, record, budget, tuned_out=None, tiny=False):
    """Times the candidates of each shape and kernel, the default first, for an equal share
    of ``budget`` seconds; prints each winner as found and rewrites ``tuned_out`` with all
    winners so far ({"fwd,384,128,197": [block_d, num_warps, num_stages, segments, layout]})."""
    from vim_jax.kernels import selective_scan as k

    shapes = TINY_SWEEP_SHAPES if tiny else SWEEP_SHAPES
    share = budget / sum(len(kinds) for *_, kinds in shapes)
    winners = {}
    static = dict(softplus=True, reverse=False, has_z=True, chunk=ss.STATE_CHUNK,
                  interpret=jax.default_backend() != "gpu")
    for model, d, b, l, kinds in shapes:
        a = kernel_args(inputs(jax.random.key(0), b, l, d))
        _, _, _, bwd_args = _kernel_fns(a, interpret=static["interpret"])
        # What every candidate must reproduce before it is timed: the reference backend's
        # output, and the backward of the measured default (which --check compared with it).
        expected = {"fwd": [jax.jit(functools.partial(ss.selective_scan, delta_softplus=True, backend="reference"))(
                        **inputs(jax.random.key(0), b, l, d))],
                    "bwd": jax.jit(lambda *x: k.backward(*x, config=k.default_config(
                        b, l, d, ss.STATE_CHUNK, "bwd"), **static))(*bwd_args)}
        for kind in kinds:
            best, deadline = None, time.perf_counter() + share
            for i, cfg in enumerate(candidates(kind, b, l, d)):
                if time.perf_counter() > deadline or (tiny and i == 2):
                    break
                if kind == "fwd":
                    fn = jax.jit(lambda *x, cfg=cfg: k.forward(*x, save_states=False, config=cfg, **static)[:1])
                    fn_args = a
                else:
                    fn = jax.jit(lambda *x, cfg=cfg: k.backward(*x, config=cfg, **static))
                    fn_args = bwd_args
                try:
                    # bfloat16 inputs: results within bfloat16 rounding (2^-7) of the expected.
                    err = max(rel_err(x, y) for x, y in zip(fn(*fn_args), expected[kind]))
                    if not err < 2 ** -7:
                        print(f"{kind} {model} b={b} L={l} {cfg}: WRONG (rel. error {err:.2e}), not timed",
                              flush=True)
                        record(dict(model=model, d_inner=d, batch=b, length=l, kernel=kind, config=cfg._asdict(),
                                    status="wrong", rel_err=err))
                        continue
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
                record(dict(model=model, d_inner=d, batch=b, length=l, kernel=kind, config=best[0]._asdict(),
                            ms=best[1] * 1e3, status="winner"))
                winners[(kind, d, b, l)] = best[0]
                if tuned_out:
                    tuning.save(tuned_out, winners)
    print("TUNED = {")
    for key, cfg in winners.items():
        print(f"    {key!r}: Config{tuple(cfg)!r},")
    print("}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness only")
    p.add_argument("--ptxas", action="store_true", help="--check on a GPU: ptxas -v of its kernels")
    p.add_argument("--sweep", action="store_true", help="time the launch candidates (GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a rehearsal on the CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=600, help="--sweep: stop after this many seconds")
    p.add_argument("--json", help="append one JSON object per measurement to this file")
    p.add_argument("--tuned-out", help="--sweep: write the winners here (for $VIM_JAX_SCAN_TUNED)")
    args = p.parse_args()
    for name in ("repeats", "budget"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")

    def record(row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    gpu = jax.default_backend() == "gpu"
    if args.sweep:
        if not gpu and not args.tiny:
            p.error("--sweep times kernels on a GPU; off one, only --sweep --tiny (a rehearsal)")
        sweep(args.repeats, record, args.budget, args.tuned_out, args.tiny)
        return
    if args.check or not gpu:
        import tempfile
        ptxas_dir = tempfile.mkdtemp(prefix="scan_ptx_") if args.ptxas and gpu else None
        ok = check(args.tiny, ptxas_dir)
        record(dict(check="ok" if ok else "failed", device=jax.devices()[0].device_kind))
        if not args.check:
            print("no GPU: timings skipped (they would measure interpret mode)")
        raise SystemExit(0 if ok else 1)
    bench(args.repeats, record)


if __name__ == "__main__":
    main()
