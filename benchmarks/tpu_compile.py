"""Compile the project for TPU chips and pod slices on a machine without a TPU: what fits where.

    python benchmarks/tpu_compile.py [--ci] [--jsonl F] [--only SECTION,...]

Needs a venv of its own with libtpu (it changes how jax starts, so it stays out of the test
venv; .ci/run builds it):

    pip install "jax[tpu]==0.10.2" flax optax orbax-checkpoint ml_collections \\
        && pip install --no-deps -e .

libtpu's compile-only topologies (``jax.experimental.topologies``) give TPU devices that run
the real TPU compiler, XLA and Mosaic, without a TPU: an over-budget program fails to
compile exactly as on the chip. Topology names libtpu 0.0.42.1 accepts (a 1x1 slice is
refused, so single-chip programs use the first device of a 2x2): ``v5e:4x4`` (16 chips),
``v5e:8x8`` (64), ``v6e:4x4``, ``v6e:8x8``, ``v5p:2x2x4`` (16), ``v5p:4x4x4`` (64). Sections,
one row per program:

- ``mixers``: both sequence mixers alone on one chip as the models call them (backend
  "auto": the Mosaic kernels on TPU; the whole table adds each mixer's XLA form, "xla", to
  compare), forward and forward + backward, at Vim-Ti/S/B and ViG-T/S/B/ViG-H widths, 224
  and 1248/1024 px, float32 and bfloat16: per-chip HBM, the Mosaic calls
  (``tpu_custom_call``) in the program, the bytes the compiler's cost model says it moves
  and the compiled program's size.
- ``recipes``: every recipe's train step (``configs/vim_*``, ``configs/vig_*``, the UperNet
  configs) at its per-chip batch (the recipe's global batch over the devices its paper
  trained on: 8 for ImageNet, 4 for ADE20K), with its own dtype, remat and shardings
  (FSDP where the config says), on 16- and 64-chip slices: per-chip HBM from
  ``memory_analysis()`` against the chip's HBM, and the largest per-chip batch that fits,
  estimated from two compiles (memory is affine in the batch) and marked as estimated.
- ``forward``: Vim-Ti, ViG-T and DeiT-Ti forward features at batch 8, 224 to 1248 px, one
  v5e chip, bfloat16: per-chip HBM and each model's ratio to DeiT-Ti's (the Vim paper's
  memory claim: at most 13.2% at 1248 px).

``--ci`` runs the mixers' rows at the Ti models' widths, the Ti recipes' train steps on v5e's 16 chips, and the
forward rows at 224 and 1248 px. Rows are appended to ``--jsonl`` as each compiles, and a
rerun with the same file skips the rows compiled there (an interrupted table loses nothing;
each row names the commit that compiled it, and a reused row is printed with its commit;
rows are reused whatever code compiled them, so start a new file after changing the code).
Exits non-zero on a compile failure, or when a Ti recipe (Vim-Ti, ViG-T, ViG-H-T: as
configured) does not fit one v5e chip at 128 images a chip.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host builds models; TPUs are compile-only
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# HBM a chip (GiB), as the chips' documentation gives it; the compiler's own budget is a
# little less (v5e: 15.75 GiB usable of 16).
HBM_GIB = {"v5e": 16, "v6e": 32, "v5p": 95}
SLICES = {"v5e": {16: "v5e:4x4", 64: "v5e:8x8"}, "v6e": {16: "v6e:4x4", 64: "v6e:8x8"},
          "v5p": {16: "v5p:2x2x4", 64: "v5p:4x4x4"}}
RECIPES = ("vim_tiny", "vim_small", "vim_base", "vim_finetune_stride8", "vig_tiny", "vig_small",
           "vig_base", "vig_h_tiny", "vig_h_small", "vig_h_base", "upernet_vim_tiny",
           "upernet_vig_h_tiny")
TI_RECIPES = ("vim_tiny", "vig_tiny", "vig_h_tiny")
# The devices each task's recipe was published with: its global batch over these is the
# per-chip batch (ImageNet: 1024 over 8 GPUs; ADE20K: 32 over 4 GPUs x 8 images).
PAPER_DEVICES = {"classification": 8, "segmentation": 4}
FORWARD_MODELS = ("vim_tiny", "vig_tiny", "deit_tiny")
FORWARD_SIZES = (224, 512, 1024, 1248)
# (model, mixer, d_inner or heads x (dk, dv), tokens at 224 px and at high resolution)
MIXERS = (("Vim-Ti", "scan", 384, (197, 6085)), ("Vim-S", "scan", 768, (197, 6085)),
          ("Vim-B", "scan", 1536, (197, 6085)), ("ViG-T", "gla", (3, 32, 64), (196, 4096)),
          ("ViG-S", "gla", (6, 32, 64), (196, 4096)), ("ViG-B", "gla", (12, 32, 64), (196, 4096)),
          ("ViG-H-T", "gla", (2, 16, 32), (3136,)))
CI_MIXERS = ("Vim-Ti", "ViG-T", "ViG-H-T")
REMAT = None  # --remat: every recipe's model.remat replaced
SELECTED = None  # --recipes


def topology(name: str):
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


@functools.cache
def usable_gib(chip: str) -> float:
    """The HBM the TPU compiler lets a program use on ``chip`` (GiB), read from its own
    refusal of a program far over it ("exceeds available HBM (15.75G)" on v5e)."""
    dev = jax.sharding.SingleDeviceSharding(topology(next(iter(SLICES[chip].values())))[0])
    big = jax.ShapeDtypeStruct((HBM_GIB[chip] * 2, 2**28), jnp.float32, sharding=dev)
    try:
        jax.jit(lambda x: x * 2).lower(big).compile()
    except Exception as e:  # noqa: BLE001 - the refusal is what is read
        found = re.search(r"available HBM \(([0-9.]+)G\)", str(e))
        if found:
            return float(found.group(1))
    raise RuntimeError(f"the TPU compiler did not state its HBM budget for {chip}")


def hbm_bytes(compiled) -> tuple[int, int]:
    """(per-chip HBM: arguments + outputs - donated + temporaries + code, temporaries)."""
    ma = compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
    return total, ma.temp_size_in_bytes


def mosaic_calls(lowered) -> int:
    return lowered.as_text().count("tpu_custom_call")


def compile_row(row: dict, lower) -> dict:
    """Compiles ``lower()``'s program; fills ``row`` with its memory or why it failed."""
    t = time.perf_counter()
    try:
        lowered = lower()
        row["mosaic_calls"] = mosaic_calls(lowered)
        compiled = lowered.compile()
        total, temp = hbm_bytes(compiled)
        row.update(status="ok", gib=round(total / 2**30, 3), temp_gib=round(temp / 2**30, 3))
        # What the compiler lets one compare without a chip besides memory: the bytes its
        # cost model says the program moves (a while loop's body counted once, so an XLA
        # scan over chunks is undercounted) and the compiled program's size.
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row.update(accessed_gib=round(float((cost or {}).get("bytes accessed", 0.0)) / 2**30, 3),
                   program_kib=round(len(compiled.as_text()) / 1024))
        # The compiler has accepted programs whose memory analysis exceeds the chip (ViG-H-T's
        # train step: 20.5 GiB on v5e's 15.75): counted as not fitting.
        if row["gib"] > usable_gib(row["chip"]):
            row.update(status="does not fit", needs_gib=row["gib"],
                       error=f"memory analysis {row['gib']} GiB > the compiler's {usable_gib(row['chip'])} GiB")
    except Exception as e:  # noqa: BLE001 - recorded as the row's outcome
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            used = re.search(r"([0-9.]+)([MG]) of ([0-9.]+)G hbm", text) or re.search(
                r"\(([0-9.]+)([MG])\) exceeds", text)
            row["status"] = "does not fit"
            if used:
                row["needs_gib"] = round(float(used.group(1)) / (1024 if used.group(2) == "M" else 1), 2)
            row["error"] = next((line for line in text.splitlines() if "memory" in line.lower()), text)[:300]
        else:
            row.update(status="failed", error=f"{type(e).__name__}: {text[:500]}")
    row["compile_s"] = round(time.perf_counter() - t, 1)
    return row


def sds(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- mixers
def mixer_rows(ci: bool):
    """Each mixer as "auto" runs it on TPU (the Mosaic kernels); the whole table adds each
    with its XLA form ("xla": the scan's reference, the GLA's chunked form), the comparison
    behind the TPU defaults."""
    for model, mixer, width, lengths in MIXERS:
        if ci and model not in CI_MIXERS:
            continue
        for backend in ("auto",) if ci else ("auto", "xla"):
            for length in lengths:
                for dtype in ("float32", "bfloat16"):
                    for kind in ("fwd", "fwd+bwd"):
                        yield dict(section="mixers", model=model, mixer=mixer, backend=backend, tokens=length,
                                   dtype=dtype, kind=kind, chip="v5e", batch=8 if length > 1024 else 128)


def mixer_program(row):
    from vim_jax.mixers.gla import bigla
    from vim_jax.mixers.selective_scan import selective_scan

    dev = topology("v5e:2x2")[0]
    one = jax.sharding.SingleDeviceSharding(dev)
    b, l, dt = row["batch"], row["tokens"], jnp.dtype(row["dtype"])
    width = dict((m, w) for m, _, w, _ in MIXERS)[row["model"]]
    if row["mixer"] == "scan":
        d, n = width, 16
        shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,), z=(b, l, d),
                      delta_bias=(d,))
        f32 = {"A", "D", "delta_bias"}

        backend = "reference" if row["backend"] == "xla" else row["backend"]

        def fwd(x):  # a Vim block's two directions (each with its own inputs in the model)
            return sum(selective_scan(**x, delta_softplus=True, reverse=r, backend=backend).astype(jnp.float32).sum()
                       for r in (False, True))
    else:
        h, dk, dv = width
        shapes = dict(q=(b, l, h, dk), k=(b, l, h, dk), v=(b, l, h, dv), g_fwd=(b, l, h, dk), g_bwd=(b, l, h, dk))
        f32 = set()

        backend = "chunked" if row["backend"] == "xla" else row["backend"]

        def fwd(x):
            return sum(o.astype(jnp.float32).sum() for o in bigla(**x, backend=backend))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32 if k in f32 else dt, sharding=one) for k, s in shapes.items()}
    fn = fwd if row["kind"] == "fwd" else jax.grad(fwd)
    return lambda: jax.jit(fn).lower(args)


# ----------------------------------------------------------------------------- recipes
def recipe_rows(ci: bool):
    """Every recipe on v5e's 16 chips first, then at half its batch there (the largest batch
    estimate), then v6e's 16, v5e's 64 (every recipe on a larger slice), v5p's 16 and the other
    64-chip slices: the most telling rows first, so a table cut short (and resumed with --jsonl)
    has them."""
    recipes = SELECTED or (TI_RECIPES if ci else RECIPES)
    slices = [("v5e", 16)] if ci else [("v5e", 16), "half", ("v6e", 16), ("v5e", 64), ("v5p", 16), ("v6e", 64),
                                      ("v5p", 64)]
    for where in slices:
        for recipe in recipes:
            chip, n = ("v5e", 16) if where == "half" else where
            row = dict(section="recipes", recipe=recipe, chip=chip, chips=n, topology=SLICES[chip][n],
                       **({"remat_override": REMAT} if REMAT else {}))
            yield dict(row, half_batch=True) if where == "half" else row


def load_recipe(name: str):
    import importlib

    config = copy.deepcopy(importlib.import_module(f"configs.{name}").get_config())
    config.model.pretrained = ""  # shapes only: no checkpoint to read
    if REMAT:
        config.model.remat = REMAT
    return config


def recipe_program(row):
    import optax
    from vim_jax.parallel import sharding as shd
    from vim_jax.train.config import build_model
    from vim_jax.train.setup import task_of, train_program

    config = load_recipe(row["recipe"])
    task = task_of(config)
    per_chip = config.optim.batch_size // PAPER_DEVICES[task]
    if row.get("half_batch"):
        per_chip //= 2
    mesh = Mesh(np.asarray(topology(row["topology"])), (shd.AXIS,))
    model = build_model(config, config.model.num_classes)
    model.train()
    step, state, shardings = train_program(config, model, optax.constant_schedule(1e-3), mesh)
    size, b = config.data.image_size, per_chip * mesh.size
    row.update(per_chip_batch=per_chip, model=config.model.name, dtype=config.model.dtype,
               remat=config.model.get("remat"), fsdp=bool(config.train.fsdp), image_size=size)
    bs = shd.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=bs)
    labels = jax.ShapeDtypeStruct((b, size, size) if task == "segmentation" else (b,), jnp.int32, sharding=bs)
    args = (sds(state, shardings), images, labels)

    def lower():
        with jax.set_mesh(mesh):
            return jax.jit(step, in_shardings=(shardings, bs, bs), out_shardings=(shardings, None),
                           donate_argnums=0).lower(*args)
    return lower


# ----------------------------------------------------------------------------- forward
def forward_rows(ci: bool):
    for size in ((224, 1248) if ci else FORWARD_SIZES):
        for model in FORWARD_MODELS:
            yield dict(section="forward", model=model, size=size, batch=8, dtype="bfloat16", chip="v5e")


def forward_program(row):
    from flax import nnx

    from efficiency import build

    one = jax.sharding.SingleDeviceSharding(topology("v5e:2x2")[0])
    graphdef, state = nnx.split(build(row["model"], row["size"], row["dtype"]))
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward_features(x))
    images = jax.ShapeDtypeStruct((row["batch"], row["size"], row["size"], 3), jnp.float32, sharding=one)
    return lambda: fn.lower(sds(state, jax.tree.map(lambda _: one, state)), images)


SECTIONS = {"mixers": (mixer_rows, mixer_program), "recipes": (recipe_rows, recipe_program),
            "forward": (forward_rows, forward_program)}


# What names a row (a planned row has these; compiling adds the rest).
IDENTITY = {"mixers": ("model", "mixer", "backend", "tokens", "dtype", "kind", "chip", "batch"),
            "recipes": ("recipe", "chip", "chips", "half_batch", "remat_override"),
            "forward": ("model", "size", "batch", "dtype", "chip")}


def key(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in ("section",) + IDENTITY[row["section"]]}, sort_keys=True)


def describe(row: dict) -> str:
    if row["section"] == "recipes":
        what = (f"{row['recipe']:<22} {row['chip']} x{row['chips']:<3} {row.get('per_chip_batch', '?'):>4}/chip "
                f"{row.get('dtype', '')} remat={row.get('remat')}{' fsdp' if row.get('fsdp') else ''}")
    elif row["section"] == "forward":
        what = f"{row['model']:<10} {row['size']:>5}px b{row['batch']} {row['dtype']}"
    else:
        what = (f"{row['model']:<8} {row['mixer']} {row.get('backend', 'auto'):<4} {row['kind']:<7} L={row['tokens']:<5} "
                f"b{row['batch']} {row['dtype']}")
    if row["status"] == "ok":
        out = (f"{row['gib']:7.2f} GiB (temp {row['temp_gib']:.2f}), {row['mosaic_calls']} Mosaic calls, "
               f"{row.get('accessed_gib', '?')} GiB accessed, {row.get('program_kib', '?')} KiB program")
    elif row["status"] == "does not fit":
        out = f"DOES NOT FIT ({row.get('needs_gib', '?')} GiB)"
    else:
        out = row["error"][:200]
    return f"{row['section']:<8} {what}: {row['status']}: {out} [{row['compile_s']} s]"


def summarise(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Ratios to DeiT-Ti, the largest batch estimates, and the failures that fail the run."""
    lines, bad = [], []
    fwd = {(r["model"], r["size"]): r for r in rows if r["section"] == "forward" and r["status"] == "ok"}
    for (model, size), r in sorted(fwd.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        deit = fwd.get(("deit_tiny", size))
        if deit and model != "deit_tiny":
            r["ratio_to_deit"] = round(r["gib"] / deit["gib"], 4)
            lines.append(f"forward {model} {size}px: {r['gib'] * 1024:.0f} MiB, "
                         f"{100 * r['ratio_to_deit']:.1f}% of DeiT-Ti's {deit['gib'] * 1024:.0f} MiB")
    full = {(r["recipe"], r["chip"], r["chips"]): r for r in rows if r["section"] == "recipes" and not r.get("half_batch")}
    for r in rows:
        if r["section"] == "recipes" and r.get("half_batch") and r["status"] == "ok":
            f = full.get((r["recipe"], r["chip"], r["chips"]))
            if f and f.get("status") == "ok" or f and f.get("needs_gib"):
                hi = f["gib"] if f["status"] == "ok" else f["needs_gib"]
                slope = (hi - r["gib"]) / (f["per_chip_batch"] - r["per_chip_batch"])
                for chip in HBM_GIB:
                    # Anchored at the chip's own compile at the recipe's batch where there is
                    # one (each chip's compiler lays out differently), at v5e's otherwise.
                    own = full.get((r["recipe"], chip, r["chips"]))
                    at = own if own and own.get("status") == "ok" else f
                    gib = at["gib"] if at["status"] == "ok" else at["needs_gib"]
                    est = (int(at["per_chip_batch"] + (usable_gib(chip) - gib) / slope) if slope > 0 else None)
                    f.setdefault("max_batch_estimate", {})[chip] = est
                lines.append(f"recipe {r['recipe']}: {slope * 1024:.1f} MiB a further image a chip on v5e; "
                             f"largest per-chip batch estimated from that and each chip's own compile at "
                             f"{f['per_chip_batch']} a chip (v5e's where it has none) and budget: "
                             f"{f['max_batch_estimate']}")
    lines += fits_table(rows)
    for r in rows:
        if r["status"] == "failed":
            bad.append(f"compile failure: {describe(r)}")
        if (r["section"] == "recipes" and r["recipe"] in TI_RECIPES and r["chip"] == "v5e" and r["chips"] == 16
                and not r.get("half_batch") and r["status"] == "does not fit"):
            bad.append(f"a Ti recipe does not fit one v5e chip at {r.get('per_chip_batch')} a chip: {describe(r)}")
    return lines, bad


def fits_table(rows: list[dict]) -> list[str]:
    """What fits where, as a Markdown table: each recipe's per-chip GiB at its per-chip batch
    on each slice compiled ("no": over the chip's budget), with the commits that compiled it."""
    full = [r for r in rows if r["section"] == "recipes" and not r.get("half_batch") and r["status"] != "failed"]
    slices = [(c, n) for n in (16, 64) for c in HBM_GIB if any((r["chip"], r["chips"]) == (c, n) for r in full)]
    if not slices:
        return []
    gib = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "?"
    cell = {(r["recipe"], r["chip"], r["chips"]): gib(r["gib"]) if r["status"] == "ok"
            else f"{gib(r.get('needs_gib'))} no" for r in full}
    lines = ["", "| recipe | per-chip batch | " + " | ".join(f"{c} x{n} ({usable_gib(c):g} GiB)" for c, n in slices)
             + " |", "| --- | ---: |" + " ---: |" * len(slices)]
    for recipe in dict.fromkeys(r["recipe"] for r in full):
        batch = next(r.get("per_chip_batch", "?") for r in full if r["recipe"] == recipe)
        lines.append(f"| {recipe} | {batch} | " + " | ".join(cell.get((recipe, c, n), "") for c, n in slices) + " |")
    commits = sorted({r.get("commit", "?") for r in full})
    return lines + [f"(GiB a chip; commits {', '.join(commits)})", ""]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ci", action="store_true", help="the selection .ci/run compiles")
    p.add_argument("--jsonl", default=None, help="append rows here; rows already in it are skipped")
    p.add_argument("--remat", choices=("none", "mixer", "full"), help="recipes: this remat instead of theirs")
    p.add_argument("--recipes", default=None, help="recipes: a comma list of configs/ names instead")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    args = p.parse_args()
    global REMAT, SELECTED
    REMAT = args.remat
    SELECTED = args.recipes and tuple(args.recipes.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"jax {jax.__version__}, libtpu topologies, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    done = {}
    if args.jsonl and os.path.exists(args.jsonl):
        for line in open(args.jsonl):
            r = json.loads(line)
            if r["status"] != "failed":  # a failure is compiled again
                done[key(r)] = r
    rows = []
    for section in args.only.split(","):
        if section not in SECTIONS:
            raise SystemExit(f"--only: {section!r} is not one of {list(SECTIONS)}")
        plan, program = SECTIONS[section]
        for row in plan(args.ci):
            if key(row) in done:
                rows.append(done[key(row)])
                print(f"(from --jsonl, commit {rows[-1].get('commit', '?')})", describe(rows[-1]), flush=True)
                continue
            try:
                lower = program(row)
            except Exception as e:  # noqa: BLE001 - building the program failed: a failure row
                row.update(status="failed", error=f"building: {type(e).__name__}: {str(e)[:400]}", compile_s=0)
            else:
                compile_row(row, lower)
            row["commit"] = commit
            rows.append(row)
            print(describe(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    lines, bad = summarise(rows)
    print("\n".join(lines))
    print(f"{len(rows)} programs, {sum(r['status'] == 'ok' for r in rows)} compiled, "
          f"{sum(r['status'] == 'does not fit' for r in rows)} do not fit, {len(bad)} failing the check")
    for b in bad:
        print("FAIL", b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
