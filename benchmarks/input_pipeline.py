"""Host input pipeline throughput: can the CPU feed the accelerator?

    python benchmarks/input_pipeline.py [--images 512] [--cores 1,2] [--json out.json]

Writes ``--images`` JPEGs at ImageNet-like sizes (short side 333-500 px, quality 90, smooth
colour fields with edges and noise, so they compress like photographs) into an image folder,
then times, in a fresh process pinned to each core count in ``--cores``:
- train: the Vim-Ti recipe's pipeline (decode, random resized crop 224, flip, RandAugment
  m9, normalise, random erasing 0.25, repeated augmentation 3, batching 128);
- eval: decode, resize the short side to 256, centre crop 224, batching 128.

Prints images/s and images/s per core (``--seconds`` of batches after two warm-up ones), and
how many such cores one accelerator needs at ``--accelerator-img-s`` training images/s.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Vim-Ti at batch 128: a GPU step of "tens of milliseconds" (40 ms assumed) until the GPU
# suite measures it: 128 / 0.040 s.
DEFAULT_ACCELERATOR_IMG_S = 3200.0


def write_jpegs(root: str, n: int, classes: int = 8) -> None:
    """``n`` photograph-like JPEGs per split under root/{train,val}/class_XX/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            short = int(rng.integers(333, 501))
            long_ = int(short * rng.choice([1.0, 4 / 3, 1.5]))
            h, w = (short, long_) if rng.random() < 0.8 else (long_, short)
            # Low-frequency colour field + a few hard-edged shapes + sensor-like noise.
            coarse = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
            img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
            for _ in range(6):
                y, x = rng.integers(0, h), rng.integers(0, w)
                img[y:y + h // 4, x:x + w // 4] = rng.uniform(0, 255, 3)
            img += rng.normal(0, 6, img.shape)
            d = os.path.join(root, split, f"class_{i % classes:02d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                os.path.join(d, f"img_{i:05d}.JPEG"), quality=90)


def _rate(batches, seconds: float) -> float:
    """images/s over ``seconds`` (at least two batches) of an iterator of masked batches,
    after two warm-up batches (tf.data's autotuning settles)."""
    for _ in range(2):
        next(batches)
    t, n = time.perf_counter(), 0
    while True:
        n += int(next(batches)["mask"].sum())
        if time.perf_counter() - t >= seconds and n:
            return n / (time.perf_counter() - t)


def measure(root: str, batch: int, seconds: float) -> dict:
    """images/s of the train and eval pipelines in this process."""
    sys.path.insert(0, ROOT)
    import numpy as np
    from configs.vim_tiny import get_config
    from vim_jax.data.pipeline import eval_batches, train_batches
    from vim_jax.data.sources import make_source

    cfg = get_config().data
    train_src, eval_src = make_source("folder", root, "train"), make_source("folder", root, "val")

    def train():
        for b in train_batches(train_src, cfg, seed=0, local_batch=batch):
            yield {"mask": np.ones(len(b["label"]))}

    def evaluation():
        while True:  # pass after pass
            yield from eval_batches(eval_src, cfg, local_batch=batch)

    return {"train_img_s": _rate(train(), seconds), "eval_img_s": _rate(evaluation(), seconds)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs per split")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seconds", type=float, default=20, help="timed seconds per pipeline and core count")
    p.add_argument("--cores", default=",".join(str(c) for c in (1, len(os.sched_getaffinity(0)))),
                   help="comma-separated core counts to pin the measuring process to")
    p.add_argument("--accelerator-img-s", type=float, default=DEFAULT_ACCELERATOR_IMG_S,
                   help="training images/s one accelerator consumes (default: an estimate)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--_measure", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._measure:  # the pinned child
        print(json.dumps(measure(args._measure, args.batch, args.seconds)))
        return

    available = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        write_jpegs(root, args.images)
        print(f"wrote {2 * args.images} JPEGs in {time.perf_counter() - t:.0f} s", flush=True)
        results = []
        for cores in sorted({int(c) for c in args.cores.split(",")}):
            if cores > len(available):
                sys.exit(f"--cores {cores}: this process may use {len(available)} cores")
            cmd = [sys.executable, os.path.abspath(__file__), "--_measure", root,
                   "--batch", str(args.batch), "--seconds", str(args.seconds)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               preexec_fn=lambda c=cores: os.sched_setaffinity(0, available[:c]))
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            m = json.loads(r.stdout.strip().splitlines()[-1])
            row = {"cores": cores, **m, "train_img_s_per_core": m["train_img_s"] / cores,
                   "eval_img_s_per_core": m["eval_img_s"] / cores}
            results.append(row)
            print(f"{cores} core(s): train {m['train_img_s']:.1f} img/s ({row['train_img_s_per_core']:.1f}"
                  f"/core), eval {m['eval_img_s']:.1f} img/s ({row['eval_img_s_per_core']:.1f}/core)",
                  flush=True)
    per_core = max(r["train_img_s_per_core"] for r in results)
    need = args.accelerator_img_s / per_core
    print(f"one accelerator at {args.accelerator_img_s:.0f} train img/s needs ~{need:.0f} cores "
          f"like these ({per_core:.1f} img/s/core)")
    if args.json:
        with open(args.json, "w") as f:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip()
            json.dump({"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                       "images": args.images,
                       "batch": args.batch, "seconds": args.seconds, "results": results,
                       "accelerator_img_s": args.accelerator_img_s, "cores_per_accelerator": need}, f, indent=2)


if __name__ == "__main__":
    main()
