"""Compile the Pallas kernels for GPUs on a machine without one, and report what ptxas sees.

    python benchmarks/gpu_compile.py [--archs sm_80,sm_90] [--json F] [--quick]

Needs a venv of its own with XLA's CUDA compiler (the CUDA plugin changes how jax starts,
so it stays out of the test venv; .ci/run builds it):

    pip install jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 \\
        nvidia-cuda-nvcc-cu12 nvidia-cuda-nvdisasm && pip install --no-deps -e .

Every kernel the programs users run would launch (the selective scan's inference forward,
and its training forward and backward, both directions, at Vim-Ti/S widths for 224 and
1248 px, batch 8 to 128, float32 and bfloat16, with the launch configuration
``config_for`` picks; the GLA kernels, both directions in one launch, at ViG-T's head sizes
(dk 32, dv 64) for 224 and 1024 px and ViG-H's (16, 32) for its first and last stage at
224 px, inference and training, float32 and bfloat16, and their two-phase forms: the
forward's states walk and per-chunk outputs, the backward's adjoint walk and per-chunk
gradients) is compiled by XLA's own Triton for a compile-only sm_80 (A100)
and sm_90 (H100) device, as on a GPU; ``ptxas -v`` then reads the PTX. One row per kernel:
launch configuration, registers per thread, spill bytes, shared memory, the warps an SM
keeps resident, and, per use, the programs a launch exposes. Exits non-zero on a compile
failure, a spill, or fewer resident warps per SM than the kernel's minimum (``MIN_WARPS``;
``--min-warps`` sets the scan's).

What the GPU would execute in the steady state, read off the machine code: ptxas writes the
cubin, ``nvdisasm`` (pip package ``nvidia-cuda-nvdisasm``) turns it into SASS, and the
kernel's step loop is found: of the loops (backward branches) that hold ``MUFU.EX2`` (every
state update needs one exp2 for its decay), the innermost of those holding the most. Its
instruction count, its ``MUFU.EX2``, ``BAR``, ``SHFL`` and shared-memory instructions,
**instructions per exp2** and barriers per step (a trip of the scan's loop is
``SUB_BLOCK`` steps, of the GLA kernels' one chunk of ``CHUNK`` tokens) are in the row.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

# (name, d_inner) of the models, image sizes -> sequence lengths (patch 16, class token).
MODELS = (("Vim-Ti", 384), ("Vim-S", 768))
LENGTHS = {224: 197, 1248: 6085}
BATCHES = (8, 32, 128)
DTYPES = ("float32", "bfloat16")
D_STATE = 16
LAYOUTS = ("tile", "lanes")  # the scan's kernels, old and new, side by side

# Compile-only targets: XLA's GpuTargetConfig for an A100-SXM4 and an H100-SXM5.
ARCHS = {
    "sm_80": dict(major=8, minor=0, cores=108, smem_per_core=167936, smem_optin=166912,
                  name="A100-SXM4-80GB"),
    "sm_90": dict(major=9, minor=0, cores=132, smem_per_core=233472, smem_optin=232448,
                  name="H100-SXM5-80GB"),
}


def ptxas_arch(compute_capability) -> str:
    """ptxas's -arch for a compute capability ("9.0" or 9.0 -> sm_90a, XLA's target there)."""
    cc = str(compute_capability).replace(".", "")
    return "sm_90a" if cc == "90" else f"sm_{cc}"
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def target_config(arch: str) -> str:
    a = ARCHS[arch]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: {a['smem_per_core']}
  shared_memory_per_block_optin: {a['smem_optin']}
  threads_per_core_limit: 2048  core_count: {a['cores']}  fpus_per_core: 64
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 2039000000000  l2_cache_size: 41943040  clock_rate_ghz: 1.41
  device_memory_size: 85899345920
  cuda_compute_capability {{ major: {a['major']} minor: {a['minor']} }}
  registers_per_core_limit: {REGISTERS_PER_SM}  registers_per_block_limit: {REGISTERS_PER_SM}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{a['name']} (compile-only)"
"""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel compilation: what it is for and everything its code depends on."""
    stage: str          # "inference" (forward, no saved states) or "training" (forward + backward)
    dtype: str
    length: int
    d_inner: int
    batch: int
    reverse: bool
    layout: str = "tile"  # the state's layout over threads (kernels.LAYOUTS): old "tile", new "lanes"

    def configs(self, chunk: int):
        """The launch configuration of each kernel the stage runs, in this layout."""
        from vim_jax.kernels import selective_scan as kernels

        return tuple(kernels.config_for(s, self.batch, self.length, self.d_inner, chunk, layout=self.layout)
                     for s in (("fwd",) if self.stage == "inference" else ("fwd", "bwd")))


@dataclasses.dataclass(frozen=True)
class GlaKernel:
    """One GLA kernel compilation (both directions in one launch, as the models run it)."""
    stage: str
    dtype: str
    length: int
    dk: int
    dv: int
    heads: int
    batch: int = 8  # the grid only: one compilation serves every batch
    reverse: bool = False  # (both directions run in every launch)
    two_phase: bool = False  # a walk for the chunks' states (or their adjoints), then every chunk in parallel


# (name, dk, dv, heads, {image size: length}) of the ViG models' GLA calls.
GLA_MODELS = (("ViG-T", 32, 64, 3, {"224px": 196, "1024px": 4096}),
              ("ViG-H-T", 16, 32, 3, {"224px stage 1": 3136, "224px stage 4": 49}))


def gla_cases(quick: bool):
    for model, dk, dv, heads, lengths in GLA_MODELS[:1] if quick else GLA_MODELS:
        for (size, length), dtype, stage in itertools.product(
                list(lengths.items())[:1] if quick else lengths.items(), DTYPES, ("inference", "training")):
            yield model, size, GlaKernel(stage, dtype, length, dk, dv, heads)
            # The two-phase kernels: the forward's (the same when training) and the backward's.
            yield model, size, GlaKernel(stage, dtype, length, dk, dv, heads, two_phase=True)


def cases(quick: bool):
    """Every (model, size, batch, dtype, stage, direction) a user runs, per arch."""
    models = MODELS[:1] if quick else MODELS
    sizes = (224,) if quick else tuple(LENGTHS)
    batches = (8, 128) if quick else BATCHES
    for (model, d), size, batch, dtype, stage, reverse, layout in itertools.product(
            models, sizes, batches, DTYPES, ("inference", "training"), (False, True), LAYOUTS):
        yield model, size, Kernel(stage, dtype, LENGTHS[size], d, batch, reverse, layout)


def compile_kernels(arch: str, k: Kernel, dump: str):
    """Compiles the kernels of one (stage, shape) for ``arch``, their PTX dumped in ``dump``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vim_jax.mixers import selective_scan as scan
    from vim_jax.kernels import selective_scan as kernels

    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(arch),
                                        topology="1x1x1")
    rep = NamedSharding(jax.sharding.Mesh(np.array(topo.devices), ("x",)), P())
    dt = jnp.dtype(k.dtype)
    if isinstance(k, GlaKernel):
        return _compile_gla(k, rep, dt, dump)
    b, l, d, n, chunk = k.batch, k.length, k.d_inner, D_STATE, scan.STATE_CHUNK
    spec = lambda *shape, dtype=dt: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    f32 = jnp.float32
    ins = (spec(b, l, d), spec(b, l, d), spec(b, l, d), spec(b, l, n), spec(b, l, n),
           spec(d, n, dtype=f32), spec(d, dtype=f32), spec(d, dtype=f32))
    flags = dict(softplus=True, reverse=k.reverse, has_z=True, chunk=chunk, interpret=False)
    fwd_cfg, *bwd_cfg = k.configs(chunk)
    if k.stage == "inference":
        fn = lambda *a: kernels.forward(*a, save_states=False, config=fwd_cfg, **flags)[:2]
        args = ins
    else:
        def fn(*a):
            out, last, states = kernels.forward(*a[:8], save_states=True, config=fwd_cfg, **flags)
            return out, last, kernels.backward(*a[:8], states, a[8], a[9], config=bwd_cfg[0], **flags)
        args = ins + (spec(b, l, d), spec(b, d, n, dtype=f32))
    jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})


def _compile_gla(k: GlaKernel, rep, dt, dump: str):
    import jax
    import jax.numpy as jnp

    from vim_jax.kernels import gla

    spec = lambda *shape, dtype=dt: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    b, l, h = k.batch, k.length, k.heads
    ins = (spec(b, l, h, k.dk), spec(b, l, h, k.dk), spec(b, l, h, k.dv), spec(b, l, 2, h, k.dk, dtype=jnp.float32))
    flags = dict(scale=k.dk ** -0.5, directions=(False, True), interpret=False)
    fwd_cfg, bwd_cfg = (gla.default_config(k.dk, k.dv, s)._replace(two_phase=k.two_phase) for s in ("fwd", "bwd"))
    if k.stage == "inference":
        fn = lambda *a: gla.forward(*a, save_states=False, config=fwd_cfg, **flags)
        args = ins
    else:
        def fn(*a):  # the training forward's kernels are the inference forward's: one-walk here
            o, last, states = gla.forward(*a[:4], save_states=True, config=fwd_cfg._replace(two_phase=False),
                                          **flags)
            return o, gla.backward(*a[:4], states, last, a[4], a[5], config=bwd_cfg, **flags)
        args = ins + (spec(b, l, 2, h, k.dv), spec(b, 2, h, k.dk, k.dv, dtype=jnp.float32))
    jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})


KERNEL_NAMES = r"(?:selective_scan|gla_)\w*"

# Resident warps per SM a kernel needs. The scan is a latency-bound walk of scalar steps:
# it needs many warps to hide latency. A GLA program's work is matrix products on (16, dk)
# tiles with three (16, 16, dk) tiles live in its backward; it runs at the occupancy of
# matrix-unit kernels (flash attention's are 4 to 8 warps an SM).
MIN_WARPS = {"selective_scan": 16, "gla": 8}


def min_warps(kernel: str, scan_min: int) -> int:
    return scan_min if kernel.startswith("selective_scan") else MIN_WARPS["gla"]


def ptxas_report(ptxas: str, ptxas_arch: str, dump: pathlib.Path, nvdisasm: str | None = None):
    """{kernel name: (registers, spill stores + loads in bytes, step loop or None)} of the
    kernels in the PTX files under ``dump``, compiled by ptxas for ``ptxas_arch`` (e.g.
    sm_90a); the step loop (``step_loop``) is read off the cubin's SASS when ``nvdisasm``
    is given."""
    report = {}
    for ptx in dump.glob("*.ptx"):
        if not re.search(r"\.entry\s+" + KERNEL_NAMES, ptx.read_text()):
            continue
        cubin = ptx.with_suffix(".cubin")
        res = subprocess.run([ptxas, "-v", f"-arch={ptxas_arch}", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"ptxas failed on {ptx.name}: {res.stderr[-2000:]}")
        loops = {}
        if nvdisasm:
            sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True)
            if sass.returncode:
                raise RuntimeError(f"nvdisasm failed on {cubin.name}: {sass.stderr[-2000:]}")
            loops = {name: step_loop(f) for name, f in parse_sass(sass.stdout).items()}
        for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes "
                             r"spill loads.*?Used (\d+) registers", res.stderr, re.S):
            if re.fullmatch(KERNEL_NAMES, m.group(1)):
                report[m.group(1)] = (int(m.group(4)), int(m.group(2)) + int(m.group(3)), loops.get(m.group(1)))
    return report


_SASS_FUNCTION = re.compile(r"^\.text\.(\w+):")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+`?\(?(\.L_x_\d+)")


def parse_sass(text: str) -> dict[str, tuple[list[str], dict[str, int]]]:
    """``nvdisasm -c`` output -> {function: (its instructions, {label: instruction index})}."""
    functions, current, pending = {}, None, []
    for line in text.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = functions.setdefault(m.group(1), ([], {}))
        elif current is not None and (m := _SASS_LABEL.match(line)):
            pending.append(m.group(1))
        elif current is not None and (m := _SASS_INSTRUCTION.match(line)):
            current[1].update({label: len(current[0]) for label in pending})
            pending = []
            current[0].append(m.group(1))
    return functions


def _opcode(instruction: str) -> str:
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]  # "@!P0 BRA ..." -> "BRA"


def step_loop(function) -> dict | None:
    """The step loop of a function (``parse_sass``): of its loops (a backward branch to a label
    before it) holding ``MUFU.EX2``, the smallest of those holding the most; its counts, or
    None when no loop holds an exp2."""
    instructions, labels = function
    best = None
    for end, instruction in enumerate(instructions):
        m = _SASS_BRANCH.search(instruction)
        if not (m and labels.get(m.group(1), end + 1) <= end):
            continue
        body = [_opcode(i) for i in instructions[labels[m.group(1)]:end + 1]]
        counts = dict(instructions=len(body), ex2=sum(o.startswith("MUFU.EX2") for o in body),
                      bar=sum(o.startswith("BAR") for o in body), shfl=sum(o.startswith("SHFL") for o in body),
                      shared=sum(o.startswith(("LDS", "STS", "ATOMS", "LDSM", "STSM")) for o in body))
        if counts["ex2"] and (best is None or (counts["ex2"], -counts["instructions"])
                              > (best["ex2"], -best["instructions"])):
            best = counts
    return best


def find_nvdisasm() -> str | None:
    """nvdisasm from the ``nvidia-cuda-nvdisasm`` pip package (or PATH); None without it."""
    try:
        import nvidia
        for root in nvidia.__path__:
            for candidate in sorted(pathlib.Path(root).glob("*/bin/nvdisasm")):
                return str(candidate)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def launches(dump: pathlib.Path):
    """{kernel name: (grid, threads per block, shared memory bytes)} from XLA's thunks."""
    out = {}
    for f in dump.glob("*thunk_sequence.txt"):
        for m in re.finditer(r"kCustomKernel .*? (" + KERNEL_NAMES + r") grid: \[([\d, ]+)\] "
                             r"threads: \[(\d+), 1, 1\]\s+shared_memory: (\d+) bytes", f.read_text()):
            out[m.group(1)] = (tuple(int(x) for x in m.group(2).split(",")), int(m.group(3)), int(m.group(4)))
    return out


def resident_warps(arch: str, regs: int, threads: int, smem: int) -> int:
    """Warps an SM keeps resident (CUDA's occupancy rules: registers allocated per warp in
    units of 256 from one of the SM's 4 quarters, 1 KiB of shared memory reserved per block)."""
    warps = threads // 32
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps,
                 (4 * (REGISTERS_PER_SM // 4 // per_warp)) // warps,
                 ARCHS[arch]["smem_per_core"] // (smem + 1024))
    return blocks * warps


def run_one(job):
    arch, k, ptxas, nvdisasm = job
    dump = pathlib.Path(tempfile.mkdtemp(prefix="gpu_compile_"))
    try:
        t0 = time.time()
        compile_kernels(arch, k, str(dump))
        regs = ptxas_report(ptxas, ptxas_arch(f"{ARCHS[arch]['major']}.{ARCHS[arch]['minor']}"), dump, nvdisasm)
        sizes = launches(dump)
        rows = []
        for name, (r, spill, loop) in sorted(regs.items()):
            grid, threads, smem = sizes[name]
            rows.append(dict(kernel=name, regs=r, spill_bytes=spill, threads=threads, grid=list(grid),
                             smem=smem,
                             warps_per_sm=resident_warps(arch, r, threads, smem), loop=loop))
        return dict(ok=True, seconds=round(time.time() - t0, 1), rows=rows)
    except Exception as e:  # reported in the table; the exit code says it failed
        return dict(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}")
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def find_ptxas() -> str:
    try:
        import nvidia.cuda_nvcc
        candidate = pathlib.Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "ptxas"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if not found:
        sys.exit("ptxas not found: pip install nvidia-cuda-nvcc-cu12 (see this file's docstring)")
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="sm_80,sm_90", help=f"comma-separated, of {sorted(ARCHS)}")
    p.add_argument("--quick", action="store_true", help="Vim-Ti at 224 px, batch 8 and 128 only")
    p.add_argument("--min-warps", type=int, default=MIN_WARPS["selective_scan"],
                   help="fail a scan kernel below this many resident warps per SM")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write every row to this file")
    args = p.parse_args()
    # Before jax starts (workers inherit it): the CUDA plugin's start-up check needs a CUDA
    # runtime unless CUDA is not a platform to run on; compile-only devices need none.
    os.environ["JAX_PLATFORMS"] = "cpu"
    archs = args.archs.split(",")
    for a in archs:
        if a not in ARCHS:
            p.error(f"--archs: {a!r} is not one of {sorted(ARCHS)}")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        sys.exit("XLA's CUDA compiler is not installed in this venv: see this file's docstring")
    ptxas, nvdisasm = find_ptxas(), find_nvdisasm()
    if nvdisasm is None:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (see this file's docstring)")

    from vim_jax.mixers import selective_scan as scan
    from vim_jax.kernels import gla as gla_kernels
    from vim_jax.kernels import selective_scan as kernels

    # A kernel's code depends on its launch configuration and the array shapes (Triton
    # specialises strides), not on the grid: one compilation per (arch, stage, dtype, length,
    # width, direction, configuration) serves every batch.
    users, jobs = {}, {}
    for arch in archs:
        for model, size, k in cases(args.quick):
            cfgs = k.configs(scan.STATE_CHUNK)
            key = (arch, k.stage, k.dtype, k.length, k.d_inner, k.reverse, cfgs)
            users.setdefault(key, []).append((model, size, k.batch))
            jobs.setdefault(key, (arch, k, ptxas, nvdisasm))
        for model, size, k in gla_cases(args.quick):
            cfgs = tuple(gla_kernels.default_config(k.dk, k.dv, s)._replace(two_phase=k.two_phase and (
                             s == "bwd" or k.stage == "inference"))
                         for s in (("fwd",) if k.stage == "inference" else ("fwd", "bwd")))
            key = (arch, k.stage, k.dtype, k.length, (k.dk, k.dv), False, cfgs)
            users.setdefault(key, []).append((model, size, None))
            jobs.setdefault(key, (arch, k, ptxas, nvdisasm))
    print(f"{len(jobs)} distinct compilations for {sum(map(len, users.values()))} uses, "
          f"{args.workers} at a time", flush=True)

    # Steps a trip of each kernel's step loop covers: the scan's unrolled trip, GLA's chunk.
    # The lanes backward's step loop is its chunk loop, which holds a one-step loop of the
    # forward into its scratch and one of the adjoint: a trip of both is one step.
    def trip_steps(kernel, cfg):
        if kernel.startswith("gla"):
            return gla_kernels.CHUNK
        return kernels.TRIP_STEPS[cfg.layout, "bwd" if "bwd" in kernel else "fwd"]

    header = (f"{'arch':6} {'stage':9} {'dtype':8} {'L':>5} {'dir':4} {'kernel':28} {'layout':6} {'BD':>3} "
              f"{'warps':>5} {'seg':>3} {'regs':>4} {'spill':>5} {'smem':>6} {'warps/SM':>8} "
              f"{'loop':>5} {'ex2':>3} {'bar':>3} {'shfl':>4} {'shm':>3} {'ins/ex2':>7} {'bar/step':>8}  used by")
    rows, failures = [], 0
    with futures.ProcessPoolExecutor(args.workers) as pool:
        results = pool.map(run_one, jobs.values())
        print(header, flush=True)
        for key, res in zip(jobs, results):
            arch, stage, dtype, length, _, reverse, cfgs = key
            if not res["ok"]:
                failures += 1
                print(f"{arch:6} {stage:9} {dtype:8} {length:5} {'rev' if reverse else 'fwd':4} "
                      f"COMPILE FAILED: {res['error']}", flush=True)
                continue
            for r in res["rows"]:
                cfg = cfgs[1] if "bwd" in r["kernel"] else cfgs[0]
                # One compilation serves every batch: the programs a launch exposes are per use
                # (the scan's grid is batch x channel blocks x segments; GLA's at batch 8).
                per_batch = math.prod(r["grid"][1:])
                used_by = ", ".join(f"{m} {s}px b{b} ({b * per_batch} programs)" if b
                                    else f"{m} {s} ({math.prod(r['grid'])} programs at batch {r['grid'][0]})"
                                    for m, s, b in users[key])
                bad = r["spill_bytes"] > 0 or r["warps_per_sm"] < min_warps(r["kernel"], args.min_warps)
                failures += bad
                bd, seg = getattr(cfg, "block_d", "-"), getattr(cfg, "segments", "-")
                direction = "both" if r["kernel"].startswith("gla") else "rev" if reverse else "fwd"
                loop = r["loop"] or dict(instructions=0, ex2=0, bar=0, shfl=0, shared=0)
                steps = trip_steps(r["kernel"], cfg)
                layout = getattr(cfg, "layout", "-")
                r.update(trip_steps=steps, ins_per_ex2=round(loop["instructions"] / loop["ex2"], 1) if loop["ex2"] else None,
                         bar_per_step=round(loop["bar"] / steps, 2))
                print(f"{arch:6} {stage:9} {dtype:8} {length:5} {direction:4} "
                      f"{r['kernel']:28} {layout:6} {bd:>3} {cfg.num_warps:5} {seg:>3} {r['regs']:4} "
                      f"{r['spill_bytes']:5} {r['smem']:6} {r['warps_per_sm']:8} "
                      f"{loop['instructions']:5} {loop['ex2']:3} {loop['bar']:3} {loop['shfl']:4} {loop['shared']:3} "
                      f"{r['ins_per_ex2'] or '-':>7} {r['bar_per_step']:8}  {used_by}"
                      + ("   <-- FAILS" if bad else ""), flush=True)
                rows.append(dict(arch=arch, stage=stage, dtype=dtype, length=length, direction=direction,
                                 config=cfg._asdict(), used_by=users[key], **r))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max((r["regs"] for r in rows), default=0)
    for kind, layout in sorted({(r["kernel"], r["config"].get("layout", "")) for r in rows}):
        mine = [r for r in rows if r["kernel"] == kind and r["config"].get("layout", "") == layout]
        ratios = [r["ins_per_ex2"] for r in mine if r["ins_per_ex2"]]
        bars = [r["bar_per_step"] for r in mine]
        if ratios:
            print(f"{kind}{' (' + layout + ')' if layout else ''}: {min(ratios)}-{max(ratios)} instructions per "
                  f"exp2 in the step loop, {min(bars)}-{max(bars)} barriers per step, "
                  f"{min(r['warps_per_sm'] for r in mine)}-{max(r['warps_per_sm'] for r in mine)} warps/SM")
    print(f"{len(rows)} kernels: {sum(r['spill_bytes'] > 0 for r in rows)} spill, most registers {worst}, "
          f"fewest resident warps/SM {min((r['warps_per_sm'] for r in rows), default=0)} "
          f"(target >= {args.min_warps} for the scan, {MIN_WARPS['gla']} for GLA); {failures} failing")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
