"""Selective-scan benchmark: reference lax.scan, lax.associative_scan and the Pallas kernel.

    python benchmarks/scan_bench.py            # on a GPU: timings and GB/s at Vim shapes
    python benchmarks/scan_bench.py --check    # anywhere: correctness of the kernels (interpret on CPU)

The scan is memory-bound: the forward must read u, delta, z, B, C and write out, i.e.
(4*B*L*D + 2*B*L*N) elements. Achieved GB/s = those bytes / time, printed beside the
device's HBM bandwidth. On a CPU only the correctness check runs.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vim_jax import scan as ss

# Peak HBM bandwidth in GB/s by device kind (vendor data sheets).
HBM_GBPS = {"H100 80GB HBM3": 3350, "NVIDIA H100 80GB HBM3": 3350, "H100 PCIe": 2000,
            "NVIDIA H100 PCIe": 2000, "NVIDIA H200": 4800, "H200": 4800,
            "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA A100-SXM4-40GB": 1555}

# (model, d_inner, batch, length)
SHAPES = [("Vim-Ti", 384, 256, 197), ("Vim-S", 768, 256, 197), ("Vim-B", 1536, 128, 197),
          ("Vim-Ti", 384, 64, 6085), ("Vim-S", 768, 32, 6085), ("Vim-B", 1536, 16, 6085)]


def associative_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """The scan as jax.lax.associative_scan over (decay, input) pairs: materialises (B, L, D, N)."""
    f32 = jnp.float32
    dt = delta.astype(f32) + delta_bias
    dt = jax.nn.softplus(dt) if delta_softplus else dt
    a = jnp.exp(dt[..., None] * A)
    b = (dt * u.astype(f32))[..., None] * B.astype(f32)[:, :, None, :]

    def combine(x, y):
        return x[0] * y[0], y[0] * x[1] + y[1]

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(f32)) + D * u
    return (y * jax.nn.silu(z.astype(f32))).astype(u.dtype)


def inputs(key, b, l, d, n=16, dtype=jnp.bfloat16):
    k = jax.random.split(key, 8)
    return dict(u=jax.random.normal(k[0], (b, l, d), dtype), delta=jax.random.normal(k[1], (b, l, d), dtype) - 2,
                A=-jnp.exp(jax.random.normal(k[2], (d, n))), B=jax.random.normal(k[3], (b, l, n), dtype),
                C=jax.random.normal(k[4], (b, l, n), dtype), D=jnp.ones((d,)), z=jax.random.normal(k[5], (b, l, d), dtype),
                delta_bias=jnp.zeros((d,)))


def timed(fn, args, repeats):
    jax.block_until_ready(fn(**args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(**args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def implementations():
    def backend(name):
        return lambda **a: ss.selective_scan(**a, delta_softplus=True, backend=name)
    return {"reference": backend("reference"),
            "associative": lambda **a: associative_scan(**a, delta_softplus=True, reverse=False),
            "pallas": backend("pallas")}


def bench(repeats):
    dev = jax.devices()[0]
    peak = HBM_GBPS.get(dev.device_kind)
    print(f"device: {dev.device_kind}; HBM peak {peak or 'unknown'} GB/s; jax {jax.__version__}; bf16 inputs")
    print(f"{'model':7} {'batch':>5} {'L':>5} {'impl':12} {'fwd ms':>9} {'GB/s':>7} {'%peak':>6} {'fwd+bwd ms':>11}")
    for model, d, b, l in SHAPES:
        args = inputs(jax.random.key(0), b, l, d)
        nbytes = (4 * b * l * d + 2 * b * l * 16) * 2  # bf16
        for name, fn in implementations().items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda u, delta, B, C, z, rest: jnp.sum(
                fn(u=u, delta=delta, B=B, C=C, z=z, **rest).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
            rest = {k: args[k] for k in ("A", "D", "delta_bias")}
            try:
                t_f = timed(fwd, args, repeats)
                t_b = timed(lambda **a: grad(a["u"], a["delta"], a["B"], a["C"], a["z"], rest), args, repeats)
            except Exception as e:  # out of memory at the largest shapes, most often
                print(f"{model:7} {b:5d} {l:5d} {name:12} {'failed: ' + type(e).__name__ + ' ' + str(e)[:60]}")
                continue
            gbps = nbytes / t_f / 1e9
            pct = f"{100 * gbps / peak:5.1f}%" if peak else "   n/a"
            print(f"{model:7} {b:5d} {l:5d} {name:12} {t_f * 1e3:9.3f} {gbps:7.0f} {pct:>6} {t_b * 1e3:11.3f}",
                  flush=True)


def check():
    """Kernels vs the reference at small odd shapes (interpret mode off a GPU)."""
    worst = 0.0
    for (b, l, d, reverse) in [(2, 37, 24, False), (2, 197, 48, True), (1, 70, 40, False)]:
        args = inputs(jax.random.key(b + l + d), b, l, d, dtype=jnp.float32)
        for name in ("reference", "pallas"):
            out = ss.selective_scan(**args, delta_softplus=True, reverse=reverse, backend=name)
            g = jax.grad(lambda u: jnp.sum(ss.selective_scan(
                **{**args, "u": u}, delta_softplus=True, reverse=reverse, backend=name) ** 2))(args["u"])
            if name == "reference":
                ref = (out, g)
        err = max(float(np.abs(out - ref[0]).max() / np.abs(ref[0]).max()),
                  float(np.abs(g - ref[1]).max() / np.abs(ref[1]).max()))
        worst = max(worst, err)
        print(f"check b={b} L={l} d={d} reverse={reverse}: pallas vs reference rel. error {err:.2e}")
    print("correctness:", "OK" if worst < 1e-4 else "FAILED")
    return worst < 1e-4


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness only")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    ok = check()
    if args.check or jax.default_backend() != "gpu":
        if jax.default_backend() != "gpu":
            print("no GPU: timings skipped (they would measure interpret mode)")
        raise SystemExit(0 if ok else 1)
    bench(args.repeats)


if __name__ == "__main__":
    main()
