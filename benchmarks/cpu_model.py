"""Vim model throughput and compile time on the CPU (or whatever the default device is).

    python benchmarks/cpu_model.py [--model vim_tiny_patch16_224] [--batch 8] [--repeats 5]

Prints forward and train-step (forward + backward + AdamW) throughput in img/s
(median of the timed repeats, after a warm-up), and compile times.
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vim_jax import create_model
from vim_jax.train_step import make_train_step


def timed(fn, *args, repeats):
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-only", action="store_true", help="report compile times only")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--remat", default="mixer", choices=["mixer", "full", "none"],
                   help="what each block stores for the backward pass")
    p.add_argument("--backend", default="auto", help="selective-scan backend")
    args = p.parse_args()

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
    model = create_model(args.model, img_size=args.img_size, remat=args.remat,
                         scan_backend=args.backend)
    graphdef, params = nnx.split(model)
    images = jax.random.normal(jax.random.key(0), (args.batch, args.img_size, args.img_size, 3))
    labels = jnp.arange(args.batch) % model.num_classes

    fwd = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
    fwd_c, t_fwd_compile = compile_time(fwd, params, images)
    print(f"{args.model} batch {args.batch} @ {args.img_size}, remat={args.remat}, "
          f"scan backend {args.backend}: forward compile {t_fwd_compile:.1f} s")
    if not args.compile_only:
        fwd_c(params, images).block_until_ready()
        t = timed(fwd_c, params, images, repeats=args.repeats)
        print(f"  forward     {args.batch / t:7.2f} img/s  ({t * 1e3:.0f} ms/batch)")
    if args.skip_train:
        return

    model.train()
    tx = optax.adamw(1e-3, weight_decay=0.05)
    step, state = make_train_step(model, tx)
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
        print(f"  train step  {args.batch / t:7.2f} img/s  ({t * 1e3:.0f} ms/batch)")


if __name__ == "__main__":
    main()
