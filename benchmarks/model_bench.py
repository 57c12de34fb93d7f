"""Vim or ViG model throughput and compile time on the default device (CPU, GPU or TPU).

    python benchmarks/model_bench.py [--model vim_tiny_patch16_224] [--batch 8] [--repeats 5]
    python benchmarks/model_bench.py --cpu-devices 2   # one XLA host device per core

Prints forward and train-step (forward + backward + AdamW) throughput in img/s
(median of the timed repeats, after a warm-up), and compile times.

--cpu-devices N splits the host into N XLA devices and runs the batch data-parallel over
them (the trainer's mesh and shardings). XLA runs one device's program on one thread at a
time for most of a Vim step (the scan loops are sequential), so on a 2-core CPU two
devices keep both cores busy.
"""

import argparse
import json
import os
import platform
import statistics
import time


def timed(fn, *args, repeats):
    import jax

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_time(fn, *args):
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="fewer blocks (a rehearsal); default: the model's")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-only", action="store_true", help="report compile times only")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--remat", default="mixer", choices=["mixer", "full", "none"],
                   help="what each block stores for the backward pass")
    p.add_argument("--backend", default="auto", help="the mixer's backend (Vim's scan_backend, ViG's gla_backend)")
    p.add_argument("--tpu-kernels-on-cpu", action="store_true",
                   help="off a TPU, backend pallas runs the TPU kernels in TPU interpret mode (the TPU suite's "
                        "rehearsal)")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    p.add_argument("--json", help="append the measurements as one JSON object to this file")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the host into this many XLA CPU devices (0: leave as is)")
    args = p.parse_args()
    if args.cpu_devices:
        # Must be set before JAX creates its CPU client.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vim_jax import create_model
    from vim_jax.parallel.sharding import batch_sharding, make_mesh, state_shardings
    from vim_jax.train.step import train_step_fn

    mesh = make_mesh()
    # Under the mesh, the scan kernels run per device shard (vim_jax.mixers.selective_scan).
    jax.set_mesh(mesh)
    n_dev = mesh.devices.size
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {n_dev} devices")
    print(f"device: {n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    if args.tpu_kernels_on_cpu and jax.default_backend() != "tpu":
        from vim_jax.mixers.tpu_interpret import run_tpu_kernels_on_cpu
        run_tpu_kernels_on_cpu()
    mixer = dict(gla_backend=args.backend) if args.model.startswith("vig") else dict(scan_backend=args.backend)
    model = create_model(args.model, img_size=args.img_size, remat=args.remat, dtype=args.dtype, **mixer,
                         **({} if args.depth is None else dict(depth=args.depth)))
    row = dict(model=args.model, batch=args.batch, img_size=args.img_size, backend=args.backend,
               dtype=args.dtype, remat=args.remat, devices=n_dev, device=jax.devices()[0].device_kind,
               jax=jax.__version__)

    def peak_mb():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or None

    def peak_text():
        mb = peak_mb()
        return "" if mb is None else f", peak memory {mb:.0f} MiB"

    def record(**kw):
        row.update(kw)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    graphdef, params = nnx.split(model)
    data = batch_sharding(mesh)
    replicated = state_shardings(params, mesh, fsdp=False)
    params = jax.device_put(params, replicated)
    images = jax.device_put(
        jax.random.normal(jax.random.key(0), (args.batch, args.img_size, args.img_size, 3)), data)
    labels = jax.device_put(jnp.arange(args.batch) % model.num_classes, data)

    fwd = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x), in_shardings=(replicated, data))
    fwd_c, t_fwd_compile = compile_time(fwd, params, images)
    print(f"{args.model} batch {args.batch} @ {args.img_size}, remat={args.remat}, "
          f"mixer backend {args.backend}: forward compile {t_fwd_compile:.1f} s")
    if not args.compile_only:
        fwd_c(params, images).block_until_ready()
        t = timed(fwd_c, params, images, repeats=args.repeats)
        print(f"  forward     {args.batch / t:7.2f} img/s  ({t * 1e3:.0f} ms/batch){peak_text()}",
              flush=True)
        record(forward_img_s=args.batch / t, forward_peak_mb=peak_mb(), forward_compile_s=t_fwd_compile)
    if args.skip_train:
        return

    model.train()
    step, state = train_step_fn(model, optax.adamw(1e-3, weight_decay=0.05))
    shardings = state_shardings(state, mesh, fsdp=False)
    state = jax.device_put(state, shardings)
    step = jax.jit(step, in_shardings=(shardings, data, data), out_shardings=(shardings, None),
                   donate_argnums=0)
    step_c, t_step_compile = compile_time(step, state, images, labels)
    print(f"  train step compile {t_step_compile:.1f} s")
    if not args.compile_only:
        state, _ = step_c(state, images, labels)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            state, metrics = step_c(state, images, labels)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        t = statistics.median(times)
        print(f"  train step  {args.batch / t:7.2f} img/s  ({t * 1e3:.0f} ms/batch){peak_text()}",
              flush=True)
        record(train_img_s=args.batch / t, train_peak_mb=peak_mb(), train_compile_s=t_step_compile)


if __name__ == "__main__":
    main()
