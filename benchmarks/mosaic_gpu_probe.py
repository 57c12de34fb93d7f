"""Can Pallas's Mosaic GPU backend express the "lanes" scan? A probe, compiled for a
compile-only H100 on this CPU (no GPU), in the GPU compile check's venv:

    python benchmarks/mosaic_gpu_probe.py

The lanes layout's forward step (``vim_jax.kernels.selective_scan``: a thread holds every
state of its channel, d_state decays, updates and a sum in registers) written for Mosaic
GPU's lane semantics: a (128,) array is a warpgroup's 128 channels, one a thread. Prints
the step loop of the PTX Mosaic GPU emits (``MOSAIC_GPU_DUMP_PTX``): its instructions,
exp2, fused multiply-adds and barriers. The answer it gave is in docs/kernels.md ("Which
backend"); it times nothing.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only devices: no CUDA runtime needed
os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"

LENGTH, CHANNELS, D_STATE = 64, 128, 16


def kernel(x_ref, b_ref, a_ref, o_ref):
    """h_n = exp2(x a_n) h_n + x B_n over the sequence; out = sum_n h_n (x stands for dt)."""
    import jax

    a = [a_ref[n, :] for n in range(D_STATE)]

    def step(t, h):
        x = x_ref[t, :]
        h = tuple(jax.numpy.exp2(x * a[n]) * h[n] + x * b_ref[t, n] for n in range(D_STATE))
        o_ref[t, :] = sum(h[1:], h[0])
        return h

    zero = x_ref[0, :] * 0.0  # in the loaded rows' layout (a splat would not match the loop's)
    jax.lax.fori_loop(0, LENGTH, step, (zero,) * D_STATE)


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import pallas as pl, topologies
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.insert(0, os.path.dirname(__file__))
    import gpu_compile  # benchmarks/, beside this script

    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        sys.exit("XLA's CUDA compiler is not installed in this venv: see benchmarks/gpu_compile.py")
    topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_compile.target_config("sm_90"),
                                        topology="1x1x1")
    rep = NamedSharding(jax.sharding.Mesh(np.array(topo.devices), ("x",)), P())
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep)
    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((LENGTH, CHANNELS), jnp.float32),
                          compiler_params=plgpu.CompilerParams(approx_math=True))
    # Mosaic GPU prints the PTX from C++ to file descriptor 1: read it from a file put there.
    with tempfile.TemporaryFile("w+") as dump:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(dump.fileno(), 1)
        try:
            jax.jit(call).lower(spec(LENGTH, CHANNELS), spec(LENGTH, D_STATE), spec(D_STATE, CHANNELS)).compile()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        dump.seek(0)
        ptx = dump.read()
    # The loop: from the label a backward branch returns to, to that branch.
    loops = [(m.group(1), m.start()) for m in re.finditer(r"^(\$L__BB\d+_\d+):", ptx, re.M)]
    for label, start in loops:
        end = ptx.find(f"bra \t{label};", start)
        if end < 0:
            continue
        body = [line.strip() for line in ptx[start:end].splitlines()[1:]]
        ops = [line.split()[0] for line in body if line and line[0] not in "/.$" and not line.startswith("//")]
        count = lambda prefix: sum(o.startswith(prefix) for o in ops)
        print(f"Mosaic GPU, lane semantics, sm_90a PTX step loop ({D_STATE} states a thread): "
              f"{len(ops) + 1} instructions, {count('ex2')} ex2, {count('fma')} fma, "
              f"{count('mul.f32') + count('add.f32')} mul/add (ptxas may fuse: no .rn), "
              f"{count('bar.sync')} bar.sync, {count('ld.shared') + count('st.shared')} shared loads/stores")
        return
    sys.exit("no loop found in the PTX Mosaic GPU emitted")


if __name__ == "__main__":
    main()
