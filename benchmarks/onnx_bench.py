"""ONNX Runtime against JAX on one CPU thread: a Vim exported by ``vim_jax.export``.

    python benchmarks/onnx_bench.py [--model vim_tiny_patch16_224] [--batch 1] [--json out.json]

Exports the model (random weights: the speed is the same) with ``--format onnx``'s
function, then times a forward pass in ONNX Runtime (one intra-op thread) and in JAX's
jitted model, the process pinned to one core. Prints the file size, the export time, each
median latency (after a warm-up) and the largest logit difference.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time


def median_seconds(fn, repeats):
    fn()  # warm-up (and JAX's compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the measurements as JSON to this file")
    args = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX sizes its thread pool

    import jax
    import numpy as np

    from vim_jax import create_model, export

    model = create_model(args.model, img_size=args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        export.export_onnx(model, path, img_size=args.img_size)
        export_s = time.perf_counter() - t
        size = os.path.getsize(path)
        session = export.onnx_session(path, threads=1)
    x = np.random.default_rng(0).normal(size=(args.batch, args.img_size, args.img_size, 3))
    x = x.astype(np.float32)
    forward = jax.jit(lambda images: model(images))
    ort_s = median_seconds(lambda: session.run(["logits"], {"images": x}), args.repeats)
    jax_s = median_seconds(lambda: jax.block_until_ready(forward(x)), args.repeats)
    diff = float(np.abs(session.run(["logits"], {"images": x})[0] - np.asarray(forward(x))).max())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = dict(model=args.model, batch=args.batch, img_size=args.img_size,
                  file_mib=round(size / 2**20, 1), export_s=round(export_s, 1),
                  onnxruntime_ms=round(ort_s * 1e3, 1), jax_ms=round(jax_s * 1e3, 1),
                  max_logit_diff=diff, threads=1, commit=commit, date=time.strftime("%Y-%m-%d"),
                  machine=f"{cpu_name()}, {os.cpu_count()} cores, 1 used", jax=jax.__version__)
    import onnxruntime
    result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
