"""Vim and ViG vs DeiT: inference throughput and peak memory from 224 to 1248 pixels (the
Vim paper's Fig. 1; ViG's claim: at 1024 px ViG-T 4.8x faster than DeiT-T in 10% of its memory).

    python benchmarks/efficiency.py [--models vim_tiny,vig_tiny,deit_tiny] [--batch N] [--out DIR]

For each resolution and model: forward_features throughput (img/s; warm-up, then the
median of timed repeats) and peak memory (the device's peak_bytes_in_use on a GPU or TPU,
each configuration in its own process so peaks do not mix, the parent never holding the
device (a TPU admits one process); the compiled executable's memory analysis on the CPU). Also a training step (forward + backward + AdamW) at 224 and 512.
An out-of-memory configuration is recorded as OOM. Writes efficiency_<device>.csv/.json/.png
under --out and prints each model's ratios to its DeiT per size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SIZES = (224, 384, 512, 640, 738, 1024, 1248)
TRAIN_SIZES = (224, 512)
MODELS = {"vim_tiny": "vim_tiny_patch16_224", "vim_small": "vim_small_patch16_224",
          "vig_tiny": "vig_tiny_patch16_224", "vig_small": "vig_small_patch16_224",
          "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
PAIRS = (("vim_tiny", "deit_tiny"), ("vig_tiny", "deit_tiny"), ("vim_small", "deit_small"),
         ("vig_small", "deit_small"))
STYLES = {"vim_tiny": "o-", "vig_tiny": "D-", "deit_tiny": "s--", "vim_small": "^-",
          "vig_small": "P-", "deit_small": "v--"}


def build(model: str, size: int, dtype: str, depth: int | None = None):
    from vim_jax import create_model
    from vim_jax.models.deit import create_deit

    name = MODELS[model]
    extra = {} if depth is None else dict(depth=depth)
    if not model.startswith("deit"):
        return create_model(name, img_size=size, dtype=dtype, **extra)
    return create_deit(name, img_size=size, dtype=dtype, **extra)


def _tokens(model: str, size: int) -> int:
    """Sequence length: the patches, plus the class token of Vim and DeiT (ViG has none)."""
    return (size // 16) ** 2 + (not model.startswith("vig"))


def _is_oom(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text


def measure(model: str, size: int, mode: str, batch: int, repeats: int, dtype: str,
            depth: int | None = None) -> dict:
    """One configuration: {"img_s", "peak_mb", "compile_s"} or {"status": "OOM"/"error: ..."}."""
    row = dict(model=model, size=size, mode=mode, batch=batch, dtype=dtype, tokens=_tokens(model, size))
    try:
        m = build(model, size, dtype, depth)
        images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
        if mode == "infer":
            graphdef, state = nnx.split(m)
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward_features(x))
            args = (state, images)
        else:
            from vim_jax.train.step import make_train_step

            m.train()
            step, state = make_train_step(m, optax.adamw(1e-4))
            fn, args = step, (state, images, jnp.zeros((batch,), jnp.int32))
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        row["compile_s"] = round(time.perf_counter() - t, 2)
        def run(args):  # the train step donates its state: the next call takes the new one
            out = jax.block_until_ready(compiled(*args))
            return args if mode == "infer" else (out[0],) + tuple(args[1:])

        args = run(args)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            args = run(args)
            times.append(time.perf_counter() - t)
        row["img_s"] = round(batch / statistics.median(times), 3)
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
            row["memory_source"] = "device peak_bytes_in_use"
        else:
            ma = compiled.memory_analysis()
            peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes \
                - ma.alias_size_in_bytes
            row["peak_mb"] = round(peak / 2**20, 1)
            row["memory_source"] = "compiled memory analysis"
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        row["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
    return row


def _probe() -> tuple[str, str]:
    """(platform, device kind) of the default device, asked of a child process: this one
    must not hold an accelerator its configurations' processes need."""
    code = "import jax; print(jax.default_backend()); print(jax.devices()[0].device_kind)"
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    backend, device = lines.strip().splitlines()[-2:]
    return backend, device


def run_isolated(*args, timeout: float | None = None) -> dict:
    """measure() in a fresh process, so the device's peak memory belongs to one config; a
    configuration that runs past ``timeout`` seconds is recorded as such."""
    cmd = [sys.executable, __file__, "--one", json.dumps(args)]
    model, size, mode, batch, _, dtype = args[:6]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(model=model, size=size, mode=mode, batch=batch, dtype=dtype,
                    tokens=_tokens(model, size), status=f"timeout ({timeout} s)")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    status = "OOM" if "out of memory" in proc.stderr.lower() or "resource_exhausted" in proc.stderr.lower() \
        else f"error: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return dict(model=model, size=size, mode=mode, batch=batch, dtype=dtype, tokens=_tokens(model, size),
                status=status)


def ratios(rows, mode):
    by = {(r["model"], r["size"]): r for r in rows if r["mode"] == mode}
    out = []
    for ours, deit in PAIRS:
        for size in sorted({s for (m, s) in by if m == ours}):
            a, b = by.get((ours, size)), by.get((deit, size))
            if not a or not b:
                continue
            line = dict(pair=f"{ours}/{deit}", size=size, mode=mode)
            if a.get("status") == "ok" and b.get("status") == "ok":
                line["speed_ratio"] = round(a["img_s"] / b["img_s"], 2)
                line["memory_fraction"] = round(a["peak_mb"] / b["peak_mb"], 4)
            else:
                line["note"] = f"{ours}: {a.get('status')}, {deit}: {b.get('status')}"
            out.append(line)
    return out


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, style in STYLES.items():
        pts = [r for r in rows if r["model"] == model and r["mode"] == "infer"]
        if not pts:
            continue
        ok = [r for r in pts if r["status"] == "ok"]
        for ax, key in zip(axes, ("img_s", "peak_mb")):
            line, = ax.plot([r["size"] for r in ok], [r[key] for r in ok], style, label=model)
            for r in pts:
                if r["status"] == "OOM":
                    ax.annotate("OOM", (r["size"], ax.get_ylim()[1] if ok else 1), color=line.get_color())
    axes[0].set(title="inference throughput", xlabel="resolution (pixels)", ylabel="images / s", yscale="log")
    axes[1].set(title="peak memory", xlabel="resolution (pixels)", ylabel="MiB", yscale="log")
    for ax in axes:
        ax.set_xticks(SIZES)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vim_tiny,vig_tiny,deit_tiny", help=f"comma list of {list(MODELS)}")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--train-sizes", default=",".join(map(str, TRAIN_SIZES)))
    p.add_argument("--batch", type=int, default=None, help="default: 1 on a CPU, 32 on a GPU or TPU")
    p.add_argument("--train-batch", type=int, default=None, help="default: 2 on a CPU, 32 on a GPU or TPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 on a CPU, 10 on a GPU or TPU")
    p.add_argument("--dtype", default=None, help="default: float32 on a CPU, bfloat16 on a GPU or TPU")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--depth", type=int, default=None, help="fewer blocks (a rehearsal); default: the model's")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per configuration (GPU, TPU)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return

    backend, device = _probe()
    accel = backend in ("gpu", "tpu")  # an accelerator: measured a configuration a process
    batch = args.batch or (32 if accel else 1)
    train_batch = args.train_batch or (32 if accel else 2)
    repeats = args.repeats or (10 if accel else 3)
    dtype = args.dtype or ("bfloat16" if accel else "float32")
    tag = device.replace(" ", "_")
    print(f"device: {device}; batch {batch} (train {train_batch}); {dtype}; median of {repeats}")
    models = args.models.split(",")
    sizes = lambda text: [int(v) for v in text.split(",") if v]
    jobs = [(m, s, "infer", batch) for s in sizes(args.sizes) for m in models]
    jobs += [(m, s, "train", train_batch) for s in sizes(args.train_sizes) for m in models]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"efficiency_{tag}"
    meta = dict(device=device, backend=backend, jax=jax.__version__, batch=batch,
                train_batch=train_batch, dtype=dtype, repeats=repeats, cpu_count=os.cpu_count())
    rows = []
    for model, size, mode, b in jobs:
        job = (model, size, mode, b, repeats, dtype, args.depth)
        row = run_isolated(*job, timeout=args.run_timeout) if accel else measure(*job)
        rows.append(row)
        shown = (f"{row['img_s']:9.2f} img/s {row['peak_mb']:10.1f} MiB  (compile {row['compile_s']} s)"
                 if row.get("status") == "ok" else row.get("status"))
        print(f"{mode:5} {model:10} {size:5d}px {row['tokens']:6d} tokens: {shown}", flush=True)
        # Rewritten after every configuration: an interrupted sweep keeps what it measured.
        base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    summary = ratios(rows, "infer") + ratios(rows, "train")
    print("\nAgainst DeiT (speed ratio = the model's img/s over DeiT's; memory = its peak as a fraction of DeiT's):")
    for r in summary:
        detail = (f"speed x{r['speed_ratio']:.2f}, memory {100 * r['memory_fraction']:.1f}%"
                  if "speed_ratio" in r else r["note"])
        print(f"  {r['mode']:5} {r['pair']:20} {r['size']:5d}px  {detail}")

    base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=summary), indent=1))
    keys = ["mode", "model", "size", "tokens", "batch", "dtype", "status", "img_s", "peak_mb",
            "memory_source", "compile_s"]
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    try:
        plot(rows, base.with_suffix(".png"), f"Vim and ViG vs DeiT on {device} (batch {batch}, {dtype})")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'vim-jax[bench]')")
    print(f"wrote {base}.json/.csv/.png")
    errors = [r for r in rows if str(r.get("status", "")).startswith("error")]
    if errors:  # out of memory is a result; an error is not
        raise SystemExit(f"{len(errors)} configurations failed: " + "; ".join(
            f"{r['model']} {r['size']}px {r['status']}" for r in errors))


if __name__ == "__main__":
    main()
