"""Pallas (Triton) selective-scan kernels: fused forward and backward with recomputation.

Imported as ``vim_jax.kernels.selective_scan``; ``vim_jax.mixers.selective_scan`` chooses these kernels
for the platforms they are written for. Same layout and semantics as ``vim_jax.mixers.selective_scan``
(channels-last; the equations are in docs/mixers.md).

One program per (batch element, block of BD channels) keeps its (BD, d_state) state in
registers and walks the sequence: u, delta, z, B, C are read once and the output written
once; the (B, L, D, N) states never exist in HBM. Two layouts of the state over the
program's threads (``Config.layout``), one code for both (a state is a pytree of either's
leaves):

- "tile" (the default for forwards of 1024 tokens and more, ``default_layout``): one (BD, N) tile that Triton spreads over the
  threads, so a thread holds a few (channel, state) elements and every step sums over
  the states across threads (shuffles, and a barrier once the tile spans warps).
- "lanes" (the default for backwards and shorter forwards: an H100 ran them 1.54x and
  1.94x faster than tiles at Vim-Ti batch 128, 224 px): N vectors of BD channels, a
  thread holding every state of its channel, as mamba's CUDA kernel holds them: the sum
  over states is arithmetic in registers and the forward has no cross-thread step at
  all. Its backward is one warp of 32 channels whose dB and dC sums over channels are
  shuffles shared out by recursive halving (``_Lanes.store_channel_sums``). Compiled, both
  lanes kernels state their fused multiply-adds, flush-to-zero exp2 and (backward)
  shuffles in PTX (``_asm``); interpret mode runs the same algorithm with plain jnp in
  their place, so only a GPU run checks those instructions' values (the GPU suite's
  smoke stage does, before its sweep times them).

Steps run in loop trips of ``TRIP_STEPS`` unrolled steps whose rows are loaded before the
trip's recurrence (latency paid once a trip; a loop, so the compiler cannot hoist a whole
chunk's rows into registers). When differentiated, the forward also writes the state
entering every chunk of T positions; chunks are position-aligned in both directions, as
the reference backend's are, so either backend's (and layout's) backward can read
either's residual. The backward walks the chunks from the end of the scan; within a chunk
the tile backward recomputes each trip's entry state from the chunk's, the lanes
backward writes the chunk's states once to a scratch block of its own and reads them back
in reverse. Full chunks run with no per-step condition; a partial chunk is a separate,
static stretch of code. exp(dt A) is exp2(dt A log2 e) with A scaled once per program.
dB and dC are reduced over d_inner outside the kernel from per-block partials, dA, dD
and d(delta_bias) from per-batch partials: no atomics, deterministic results. Register
use, spills and the machine code's step loop of every configuration the defaults can
choose are checked by ``benchmarks/gpu_compile.py`` (ptxas and nvdisasm, sm_80/sm_90).

``reverse=True`` indexes position L-1-t at step t: no flipped copies. Triton does not
mask loads and stores of a block that overhangs its array (interpret mode pads and
hides it), so no block ever overhangs: every block spans its array's full length, and
d_inner is padded to a multiple of BD in the wrapper when it is not one already
(``test_no_block_overhangs_its_array`` checks every pallas_call). d_state must be a
power of two (Triton tiles); all arithmetic is float32 whatever the input dtype. No
float min/max: Triton lowers them to NaN-dropping instructions.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from vim_jax.kernels import tuning
from vim_jax.kernels.activations import sigmoid, softplus_formula


class Config(NamedTuple):
    """Launch parameters of one kernel: channels per program, warps, pipeline stages,
    (forward only) how many segments of the sequence are scanned side by side, and how the
    state is laid out over the threads (``LAYOUTS``)."""
    block_d: int
    num_warps: int
    num_stages: int
    segments: int = 1
    layout: str = "tile"


# Measured winners of ``python benchmarks/scan_bench.py --sweep`` on a GPU, keyed by
# (kernel, d_inner, batch, length); shapes not listed use ``default_config``. A sweep's
# winners file (``tuning``, its path in $VIM_JAX_SCAN_TUNED) adds to them at import, so the
# GPU suite's later stages run what its sweep found.
TUNED: dict[tuple[str, int, int, int], Config] = tuning.from_environment("VIM_JAX_SCAN_TUNED", Config)


# Programs a launch should have to fill a GPU (an H100 has 132 SMs, each holding several).
_PROGRAMS = 512


# State elements (of a (BD, d_state) tile) a thread may hold without the kernel passing
# 128 registers (16 resident warps per SM) or spilling, as ptxas measured them. A lanes
# thread holds all d_state states of one channel: at 2 channels it passed 128 (161, sm_90).
MAX_STATE_PER_THREAD = {"fwd": 4, "bwd": 2}


def spill_free(kernel: str, cfg: Config, d_state: int = 16) -> bool:
    """Whether ``cfg`` keeps ``kernel`` within the measured register budget."""
    if cfg.layout == "lanes":
        one_channel = cfg.block_d == 32 * cfg.num_warps
        return one_channel and (kernel == "fwd" or (cfg.block_d, cfg.segments) == (32, 1))
    per_thread = cfg.block_d * d_state / (32 * cfg.num_warps)
    return 1 <= per_thread <= MAX_STATE_PER_THREAD[kernel] and (kernel == "fwd" or cfg.segments == 1)


def _segments(batch: int, length: int, d_inner: int, chunk: int, bd: int) -> int:
    """Sequence segments of at least 4 chunks when the batch alone cannot give the GPU a
    few hundred programs."""
    programs = batch * pl.cdiv(d_inner, bd)
    segments = max(1, min(pl.cdiv(_PROGRAMS, programs), pl.cdiv(length, chunk) // 4))
    return segments if programs < _PROGRAMS // 2 else 1


def default_config(batch: int, length: int, d_inner: int, chunk: int, kernel: str = "fwd",
                   layout: str | None = None) -> Config:
    """The launch a GPU timed fastest. Layout (None: ``default_layout``): "tile", channel
    blocks of BD = 16 at as many state elements a thread as ptxas allows without spilling
    (``MAX_STATE_PER_THREAD``: 2 warps forward, 4 backward), fastest of the tiles at every
    shape the H200 sweep timed (jax 0.11.2, commit 36c23d5, 2026-11-27,
    ``benchmarks/results/gpu_h200/``); "lanes", a channel a thread, 2 warps forward (0.263 ms
    against 0.325 at 1 warp and 0.271 at 4) and 1 backward, as the H100 sweep timed them
    (jax 0.11.2, commit 61528e3, 2026-12-05, ``benchmarks/results/gpu_h100/``). Forward
    segments by ``_segments``."""
    layout = layout or default_layout(length, kernel)
    if layout == "lanes":
        if kernel == "bwd":
            return Config(32, 1, 1, 1, "lanes")
        warps = 2 if d_inner > 32 else 1
        return Config(32 * warps, warps, 1, _segments(batch, length, d_inner, chunk, 32 * warps), "lanes")
    bd = min(16, pl.next_power_of_2(d_inner))
    warps = max(1, bd * 16 // (32 * MAX_STATE_PER_THREAD[kernel]))
    if kernel == "bwd":
        return Config(bd, warps, 1, 1)
    return Config(bd, warps, 1, _segments(batch, length, d_inner, chunk, bd))


def default_layout(length: int, kernel: str) -> str:
    """The layout a GPU timed faster (H100, jax 0.11.2, commit 61528e3, 2026-12-05,
    ``benchmarks/results/gpu_h100/``): "lanes" for the backward (1.00 against 1.95 ms, Vim-Ti
    batch 128 at 224 px) and for the forward below 1024 tokens (0.263 against 0.406 ms, the
    same shape); "tile" for longer forwards, where the one lanes launch timed was slower
    (3.60 against 2.64 ms at batch 32, 6085 tokens: 1248 px)."""
    return "lanes" if kernel == "bwd" or length < 1024 else "tile"


def requested_layout() -> str | None:
    """$VIM_JAX_SCAN_LAYOUT ("tile" or "lanes", ``LAYOUTS``) if set, else None."""
    layout = os.environ.get("VIM_JAX_SCAN_LAYOUT")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"VIM_JAX_SCAN_LAYOUT={layout!r} is not one of {tuple(LAYOUTS)}")
    return layout


def config_for(kernel: str, batch: int, length: int, d_inner: int, chunk: int, layout: str | None = None) -> Config:
    """The launch parameters used for ``kernel`` ("fwd" or "bwd") at a shape. The layout is
    ``layout``, else $VIM_JAX_SCAN_LAYOUT, else a sweep's winner's (``TUNED``), else
    ``default_layout`` (the faster a GPU timed); the configuration a sweep's winner in that layout, else
    ``default_config``."""
    layout = layout or requested_layout()
    tuned = TUNED.get((kernel, d_inner, batch, length))
    if tuned and layout in (None, tuned.layout):
        return tuned
    return default_config(batch, length, d_inner, chunk, kernel, layout)


def check_config(kernel: str, cfg: Config) -> Config:
    """``cfg`` if ``kernel`` ("fwd" or "bwd") can run it, else a ValueError that says why."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"Config.layout={cfg.layout!r} is not one of {tuple(LAYOUTS)}")
    if cfg.block_d & (cfg.block_d - 1) or cfg.num_warps & (cfg.num_warps - 1):
        raise ValueError(f"block_d={cfg.block_d} and num_warps={cfg.num_warps} must be powers of two "
                         "(Triton's tiles and warps)")
    if cfg.layout == "lanes" and kernel == "bwd" and (cfg.block_d, cfg.num_warps) != (32, 1):
        raise ValueError(f"the lanes backward runs one warp of 32 channels (its sums over channels are "
                         f"shuffles within a warp): got block_d={cfg.block_d}, num_warps={cfg.num_warps}")
    if cfg.block_d % (32 * cfg.num_warps) and cfg.layout == "lanes":
        raise ValueError(f"the lanes layout puts whole channels on every thread: block_d={cfg.block_d} must "
                         f"be a multiple of 32 * num_warps={32 * cfg.num_warps}")
    return cfg


def _params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# Steps whose rows are loaded together: a chunk is walked in loop trips of this many
# (unrolled) steps, so only that many steps' rows (and, backwards, states) are live at once.
SUB_BLOCK = 4
# Steps a loop trip covers, per (layout, kernel): a lanes step's rows hold N scalars of B
# and C in every thread, so fewer of them are loaded ahead.
TRIP_STEPS = {("tile", "fwd"): SUB_BLOCK, ("tile", "bwd"): SUB_BLOCK,
              ("lanes", "fwd"): 2, ("lanes", "bwd"): 1}
_LOG2E = 1.4426950408889634


class _Tile:
    """The state as one (BD, N) tile that Triton spreads over the program's threads: the
    sum over the N states is a cross-thread reduction (shuffles, and shared memory with a
    barrier once the tile spans warps) every step. B and C rows are (N,) vectors."""

    @staticmethod
    def load(ref, *index):
        return ref[index + (slice(None), slice(None))]

    @staticmethod
    def store(ref, index, h):
        ref[index + (slice(None), slice(None))] = h

    @staticmethod
    def row(ref, t):
        return ref[t, :].astype(jnp.float32)


    @staticmethod
    def col(v):
        """A (BD,) per-channel vector, broadcast against the state."""
        return v[:, None]

    @staticmethod
    def per_state(row):
        """A row (one value a state), broadcast against the state."""
        return row[None, :]

    @staticmethod
    def dot(x, y, fma):
        """sum_n x[:, n] y[:, n], (BD,)."""
        return jnp.sum(x * y, axis=1)

    @staticmethod
    def store_channel_sums(refs, t, db, dc, shfl):
        """Position t of dB and dC, this program's channels summed: (db_ref, dc_ref), (N,) each."""
        for ref, x in zip(refs, (db, dc)):
            ref[t, :] = jnp.sum(x, axis=0)


class _Lanes:
    """The state as N separate (BD,) vectors: a thread holds every state of its channels
    (BD / 32 / warps of them), so the sum over states is arithmetic in its registers, and the
    only cross-thread sums are the backward's over channels (dB, dC), within one warp
    when the program is one. B and C rows are N scalars, the same for every thread."""

    @staticmethod
    def load(ref, *index):
        return tuple(ref[index + (slice(None), k)] for k in range(ref.shape[-1]))

    @staticmethod
    def store(ref, index, h):
        for k, hk in enumerate(h):
            ref[index + (slice(None), k)] = hk

    @staticmethod
    def row(ref, t):
        return tuple(ref[t, k].astype(jnp.float32) for k in range(ref.shape[-1]))


    @staticmethod
    def col(v):
        return v

    @staticmethod
    def per_state(row):
        return row

    @staticmethod
    def dot(x, y, fma):
        return functools.reduce(lambda acc, xy: fma(*xy, acc), zip(x[1:], y[1:]), x[0] * y[0])

    @staticmethod
    def store_channel_sums(refs, t, db, dc, shfl):
        """Position t of dB and dC, this program's 32 channels summed, as one row (dbc_ref,)
        of groups of 32: dB's N values then dC's, zero-padded. One warp, a channel a lane:
        the 2N sums are shared out over the lanes by recursive halving (5 rounds of a
        shuffle, an add and two selects per value still held: 31 shuffles for 32 sums,
        where a sum at a time would take 5 each), and lane l ends with sum l: one store."""
        values = list(db) + list(dc)
        values += [jnp.zeros_like(values[0])] * (-len(values) % 32)
        lane = jax.lax.broadcasted_iota(jnp.int32, (32,), 0)
        for g in range(len(values) // 32):
            group = values[32 * g:32 * g + 32]
            offset = 16
            while len(group) > 1:
                keep_high = (lane & offset) != 0
                half = len(group) // 2
                group = [jnp.where(keep_high, hi, lo) + shfl(jnp.where(keep_high, lo, hi), offset)
                         for lo, hi in zip(group[:half], group[half:])]
                offset //= 2
            refs[0][t, pl.ds(32 * g, 32)] = group[0]


# The state's layouts (``Config.layout``); a state is a pytree of either's leaves, so the
# kernels below are written once for both.
LAYOUTS = {"tile": _Tile, "lanes": _Lanes}


def _map(f, *states):
    return jax.tree.map(f, *states)


def _asm(code, *args):
    """One PTX instruction per element. XLA's Triton writes float arithmetic with explicit
    rounding (mul.rn, add.rn), which ptxas never fuses, and jnp.exp2 as ex2.approx.f32,
    which ptxas wraps in a denormal fix-up (a compare and two multiplies): the lanes
    kernels state the fused multiply-add and the flush-to-zero exp2 they mean."""
    args = jnp.broadcast_arrays(*(jnp.asarray(a, jnp.float32) for a in args))
    return plt.elementwise_inline_asm(code, args=args, constraints="=f" + ",f" * len(args), pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])[0]


class _Walk(NamedTuple):
    """A program's view of the sequence: per-program constants, the state's layout, and
    how steps map to positions and chunks.

    Steps run in scan order (position L-1-s at step s when reversed). Chunks are
    position-aligned in both directions, as the reference backend's saved states are:
    chunk c holds positions c*T .. c*T+T-1, the last one partial (``tail`` positions).
    In step order they are "elements": element e is chunk e (chunk n_chunks-1-e when
    reversed), so the partial chunk is the last element, or the first when reversed.
    """
    lay: type          # _Tile or _Lanes
    fast: bool         # _asm's fma and exp2 (lanes, compiled); plain jnp otherwise
    a2: object         # the state's shape: A * log2(e), so exp(dt A) = exp2(dt a2)
    dskip: jax.Array   # (BD,)
    bias: jax.Array    # (BD,)
    softplus: bool
    reverse: bool
    length: int
    chunk: int

    @property
    def n_full(self):
        return self.length // self.chunk

    @property
    def tail(self):
        return self.length % self.chunk

    @property
    def n_chunks(self):
        return self.n_full + (self.tail > 0)

    @property
    def tail_element(self):
        return 0 if self.reverse else self.n_full

    @property
    def first_full(self):
        """The first full element: 1 when the partial chunk comes first (reversed)."""
        return 1 if (self.reverse and self.tail) else 0

    def pos(self, step):
        return self.length - 1 - step if self.reverse else step

    def start(self, e, partial):
        """The first step of element e (the partial one, or a full one)."""
        if partial:
            return 0 if self.reverse else self.n_full * self.chunk
        return (e - self.first_full) * self.chunk + (self.tail if self.first_full else 0)

    def chunk_of(self, e):
        return self.n_chunks - 1 - e if self.reverse else e

    def zeros(self):
        return _map(jnp.zeros_like, self.a2)

    def rows(self, vec_refs, state_refs, t):
        """Position t of (L, BD) blocks as (BD,) float32 and of (L, N) blocks as rows."""
        return ([r[t, :].astype(jnp.float32) for r in vec_refs]
                + [self.lay.row(r, t) for r in state_refs])

    def dt(self, delta):
        pre = delta + self.bias
        return pre, (softplus_formula(pre) if self.softplus else pre)

    def exp2(self, x):
        return _asm("ex2.approx.ftz.f32 $0, $1;", x) if self.fast else jnp.exp2(x)

    def fma(self, a, b, c):
        return _asm("fma.rn.f32 $0, $1, $2, $3;", a, b, c) if self.fast else a * b + c

    def shfl(self, x, offset):
        """Lane l gets lane l ^ offset's x: x is (32,), a lane an element (one warp)."""
        if self.fast:
            return _asm(f"shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;", x)
        return x[jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) ^ offset]

    def decay(self, dt):
        dt = self.lay.col(dt)
        return _map(lambda a: self.exp2(dt * a), self.a2)

    def advance(self, h, dt, u, b):
        dt_c, dtu = self.lay.col(dt), self.lay.col(dt * u)
        return _map(lambda h_, a, b_: self.fma(self.exp2(dt_c * a), h_, dtu * b_), h, self.a2,
                    self.lay.per_state(b))

    def advance_at(self, h, step, u_ref, delta_ref, b_ref):
        u, delta, b = self.rows((u_ref, delta_ref), (b_ref,), self.pos(step))
        return self.advance(h, self.dt(delta)[1], u, b)

    def readout(self, h, row):
        """sum_n h[:, n] row[n], (BD,)."""
        return self.lay.dot(h, self.lay.per_state(row), self.fma)


def _walk(layout, interpret, a_ref, d_ref, bias_ref, softplus, reverse, length, chunk):
    lay = LAYOUTS[layout]
    a2 = _map(lambda a: a.astype(jnp.float32) * _LOG2E, lay.load(a_ref))
    return _Walk(lay, layout == "lanes" and not interpret, a2, d_ref[...].astype(jnp.float32),
                 bias_ref[...].astype(jnp.float32), softplus, reverse, length, chunk)


def _groups(first, size, carry, group, sub=SUB_BLOCK):
    """``group(step, count, carry)`` over steps first .. first+size-1 in trips of ``sub``
    steps (a loop, so the compiler cannot hoist every row of a chunk at once) and a
    static remainder."""
    trips, rem = divmod(size, sub)
    carry = jax.lax.fori_loop(0, trips, lambda g, cr: group(first + g * sub, sub, cr), carry)
    return group(first + trips * sub, rem, carry) if rem else carry


def _fwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, *refs, length, chunk,
                seg_chunks, softplus, reverse, has_z, mode, save_states, layout, interpret):
    """mode "full": the whole sequence from a zero state -> out, last[, states].
    Segments side by side (program_id(2) is the segment: ``seg_chunks`` elements, see
    ``_Walk``): "summary" -> each segment's end state from a zero state and its sum of
    dt; "emit" (given each segment's true entry state) -> out[, states]. In one pass,
    full chunks run in a loop with no per-step condition and the partial one as a static
    stretch of its own; segmented, it runs padded to a whole chunk (``group``)."""
    refs = list(refs)
    entry_ref = refs.pop(0) if mode == "emit" else None
    if mode == "summary":
        end_ref, dtsum_ref = refs
    else:
        out_ref, *refs = refs
        last_ref = refs.pop(0) if mode == "full" else None
    states_ref = refs[0] if save_states and mode != "summary" else None
    w = _walk(layout, interpret, a_ref, d_ref, bias_ref, softplus, reverse, length, chunk)
    vec_refs = (u_ref, delta_ref) + ((z_ref,) if has_z and mode != "summary" else ())
    state_refs = (b_ref,) if mode == "summary" else (b_ref, c_ref)

    segmented = mode != "full"

    def group(first, count, carry):
        """``count`` steps from ``first``. Segmented, the partial chunk runs as a whole one
        whose steps outside the sequence are identity steps that store nothing: one loop,
        no branch (a separate stretch of code for it made ptxas spill)."""
        h, dt_sum = carry
        steps = [first + k for k in range(count)]
        inside = [jnp.minimum(jnp.maximum(t, 0), length - 1) for t in steps] if segmented else steps
        # A trip's loads are issued before its recurrence: latency paid once per trip.
        rows = [w.rows(vec_refs, state_refs, w.pos(t)) for t in inside]
        for t, t_in, (u, delta, *rest) in zip(steps, inside, rows):
            dt = w.dt(delta)[1]
            if segmented:  # outside the sequence: dt = 0 and no input (selects: 0 * inf is NaN)
                dt, u = (jnp.where(jnp.full(x.shape, t == t_in), x, 0.0) for x in (dt, u))
            *z, b = rest[:-1] if mode != "summary" else rest
            h = w.advance(h, dt, u, b)
            if mode == "summary":
                dt_sum = dt_sum + dt
                continue
            y = w.readout(h, rest[-1]) + w.dskip * u
            if has_z:
                y = y * z[0] * sigmoid(z[0])
            pos = w.pos(t_in)
            if segmented:
                plt.store(out_ref.at[jnp.asarray(pos, jnp.int32), :], y.astype(out_ref.dtype),
                          mask=jnp.full(y.shape, t == t_in))
            else:
                out_ref[pos, :] = y.astype(out_ref.dtype)
        return h, dt_sum

    def element(e, carry, partial):
        if states_ref is not None:  # differentiated: the state entering every chunk
            w.lay.store(states_ref, (w.chunk_of(e),), carry[0])
        return _groups(w.start(e, partial), w.tail if partial else chunk, carry, group,
                       TRIP_STEPS[layout, "fwd"])

    h0 = w.lay.load(entry_ref) if mode == "emit" else w.zeros()
    carry = (h0, jnp.zeros(w.dskip.shape, jnp.float32))
    if segmented:
        seg = pl.program_id(2)
        lo = seg * seg_chunks
        hi = jnp.minimum(lo + seg_chunks, w.n_chunks)
        # Every element as a full one: the partial chunk's start as a full one's puts its
        # padding outside the sequence, where ``group`` makes it identity steps.
        carry = jax.lax.fori_loop(lo, hi, lambda e, cr: element(e, cr, False), carry)
    else:
        if w.tail and reverse:
            carry = element(w.tail_element, carry, True)
        carry = jax.lax.fori_loop(w.first_full, w.first_full + w.n_full, lambda e, cr: element(e, cr, False),
                                  carry)
        if w.tail and not reverse:
            carry = element(w.tail_element, carry, True)
    h, dt_sum = carry
    if mode == "summary":
        w.lay.store(end_ref, (), h)
        dtsum_ref[...] = dt_sum
    elif mode == "full":
        w.lay.store(last_ref, (), h)


def _bwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, g_ref,
                glast_ref, states_ref,
                du_ref, ddelta_ref, dz_ref, *refs, length, chunk, softplus, reverse, has_z, layout,
                interpret):
    """Walks the elements (``_Walk``) from the last to the first, each from its end, from
    the element's saved entry state. "tile": in trips of SUB_BLOCK steps from the end,
    each trip's entry state recomputed from the element's, its SUB_BLOCK states into
    registers, then walked backwards: a few state tiles are live, never a chunk's.
    "lanes": the element's states once forwards into ``scratch`` (the program's own
    (T + 1, N, BD) block: a thread reads back only what it wrote, so no barrier), then
    backwards reading them, in trips of TRIP_STEPS."""
    w = _walk(layout, interpret, a_ref, d_ref, bias_ref, softplus, reverse, length, chunk)
    lay = w.lay
    # dB, dC: (db_ref, dc_ref) for tiles, (dbc_ref,) for lanes; lanes' chunk of states last.
    *sum_refs, da_ref, dd_ref, dbias_ref = refs[:-1] if layout == "lanes" else refs
    vec_refs = (u_ref, delta_ref, g_ref) + ((z_ref,) if has_z else ())

    def inputs(step):
        t = w.pos(step)
        u, delta, g, *z_b_c = w.rows(vec_refs, (b_ref, c_ref), t)
        *z, b, cc = z_b_c
        pre, dt = w.dt(delta)
        return t, u, pre, dt, b, cc, g, z

    def adjoint(x, h_prev, h, carry):
        """One step backwards, given the states entering and leaving it."""
        t, u, pre, dt, b, cc, g, z = x
        lam_next, da_acc, dd_acc, dbias_acc = carry
        y = w.readout(h, cc) + w.dskip * u
        if has_z:
            sig = sigmoid(z[0])
            gy = g * z[0] * sig
            dz_ref[t, :] = (g * y * sig * (1.0 + z[0] * (1.0 - sig))).astype(dz_ref.dtype)
        else:
            gy = g
        da = w.decay(dt)
        gy_c, dtu_c, dt_c = lay.col(gy), lay.col(dt * u), lay.col(dt)
        lam = _map(lambda c, ln: w.fma(gy_c, c, ln), lay.per_state(cc), lam_next)
        lam_ah = _map(lambda l_, a, hp: l_ * a * hp, lam, da, h_prev)
        lam_b = w.readout(lam, b)                                            # (BD,)
        lay.store_channel_sums(sum_refs, t, _map(lambda l_: l_ * dtu_c, lam), _map(lambda h_: gy_c * h_, h),
                               w.shfl)
        du_ref[t, :] = (gy * w.dskip + dt * lam_b).astype(du_ref.dtype)
        ddt = u * lam_b + lay.dot(lam_ah, w.a2, w.fma) * (1.0 / _LOG2E)
        ddelta = ddt * sigmoid(pre) if softplus else ddt
        ddelta_ref[t, :] = ddelta.astype(ddelta_ref.dtype)
        da_acc = _map(lambda acc, x_: w.fma(x_, dt_c, acc), da_acc, lam_ah)
        dd_acc = dd_acc + gy * u
        dbias_acc = dbias_acc + ddelta
        lam_next = _map(lambda a, l_: a * l_, da, lam)
        return lam_next, da_acc, dd_acc, dbias_acc

    def recompute_trips(e, carry, partial):
        first = w.start(e, partial)
        h_entry = lay.load(states_ref, w.chunk_of(e))
        size = w.tail if partial else chunk
        sub = TRIP_STEPS["tile", "bwd"]
        trips, rem = divmod(size, sub)

        def at(offset):  # the state entering step first + offset, recomputed
            return jax.lax.fori_loop(0, offset, lambda i, h: w.advance_at(h, first + i, u_ref, delta_ref, b_ref),
                                     h_entry)

        def trip(h_first, first, count, carry):
            xs = [inputs(first + k) for k in range(count)]
            hs = [h_first]
            for x in xs:
                hs.append(w.advance(hs[-1], x[3], x[1], x[4]))
            for i in reversed(range(count)):
                carry = adjoint(xs[i], hs[i], hs[i + 1], carry)
            return carry

        if rem:
            carry = trip(at(trips * sub), first + trips * sub, rem, carry)

        def back(i, cr):
            offset = (trips - 1 - i) * sub
            return trip(at(offset), first + offset, sub, cr)

        return jax.lax.fori_loop(0, trips, back, carry)

    def stored(e, carry, partial):
        first = w.start(e, partial)
        h_entry = lay.load(states_ref, w.chunk_of(e))
        size = w.tail if partial else chunk
        scratch_ref = refs[-1]

        def save(k, h):  # slot k: the state entering step k of the element
            for n, hn in enumerate(h):
                scratch_ref[k, n, :] = hn

        def forwards(k0, count, h):
            xs = [w.rows((u_ref, delta_ref), (b_ref,), w.pos(first + k0 + k)) for k in range(count)]
            for k, (u, delta, b) in enumerate(xs):
                h = w.advance(h, w.dt(delta)[1], u, b)
                save(k0 + k + 1, h)
            return h

        # Every step saves the state leaving it, the last one's too (slot ``size``, never
        # read): one loop of identical steps, no unrolled stretch beside it in the chunk's loop.
        save(0, h_entry)
        h_last = _groups(0, size, h_entry, forwards, TRIP_STEPS["lanes", "bwd"])
        load = lambda k: tuple(scratch_ref[k, n, :] for n in range(len(h_last)))

        def backwards(i0, count, cr):  # steps size-1-i0 .. size-count-i0, from the end
            carry, h = cr
            ks = [size - 1 - i0 - i for i in range(count)]
            xs = [(inputs(first + k), load(k)) for k in ks]
            for x, h_prev in xs:
                carry, h = adjoint(x, h_prev, h, carry), h_prev
            return carry, h

        return _groups(0, size, (carry, h_last), backwards, TRIP_STEPS["lanes", "bwd"])[0]

    element = stored if layout == "lanes" else recompute_trips
    zeros = jnp.zeros(w.dskip.shape, jnp.float32)
    glast = _map(lambda x: x.astype(jnp.float32), lay.load(glast_ref))
    carry = (glast, w.zeros(), zeros, zeros)
    if w.tail and not reverse:
        carry = element(w.tail_element, carry, True)
    carry = jax.lax.fori_loop(0, w.n_full, lambda i, cr: element(w.first_full + w.n_full - 1 - i, cr, False),
                              carry)
    if w.tail and reverse:
        carry = element(w.tail_element, carry, True)
    _, da_acc, dd_acc, dbias_acc = carry
    lay.store(da_ref, (), da_acc)
    dd_ref[...] = dd_acc
    dbias_ref[...] = dbias_acc


def _specs(length, n, bd, n_chunks):
    """Blocks for a grid (batch, channel block[, segment]): every block spans its array's
    full length, so none overhangs."""
    seq = pl.BlockSpec((None, length, bd), lambda i, j, *_: (i, 0, j))
    bc = pl.BlockSpec((None, length, n), lambda i, j, *_: (i, 0, 0))
    a = pl.BlockSpec((bd, n), lambda i, j, *_: (j, 0))
    vec = pl.BlockSpec((bd,), lambda i, j, *_: (j,))
    state = pl.BlockSpec((None, bd, n), lambda i, j, *_: (i, j, 0))
    states = pl.BlockSpec((None, n_chunks, bd, n), lambda i, j, *_: (i, 0, j, 0))
    return seq, bc, a, vec, state, states


def _padded(x, axis, size):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def forward(u, delta, z, B, C, A, D, bias, *, softplus, reverse, has_z, chunk, save_states,
            interpret, config: Config | None = None):
    """Returns (out (b, L, d) in u's dtype, last state (b, d, n) float32, states or None).

    states: (b, cdiv(L, chunk), d, n) float32, the state entering every chunk, written
    only when ``save_states`` (the differentiated forward). z is never read unless has_z.
    With ``config.segments`` > 1 (small batches, long sequences) the sequence is cut into
    segments scanned side by side, twice: once for each segment's end state and total
    decay, and, after a short recurrence over the segments for their true entry states,
    once more to write the outputs.
    """
    bsz, length, d = u.shape
    n = A.shape[1]
    cfg = check_config("fwd", config or config_for("fwd", bsz, length, d, chunk))
    bd = cfg.block_d
    dp = pl.cdiv(d, bd) * bd  # no block may overhang: pad the channels when d needs it
    u, delta, z = (_padded(x, 2, dp) for x in (u, delta, z))
    A, D, bias = _padded(A, 0, dp), _padded(D, 0, dp), _padded(bias, 0, dp)
    n_chunks = pl.cdiv(length, chunk)
    seg_chunks = pl.cdiv(n_chunks, cfg.segments)
    segments = pl.cdiv(n_chunks, seg_chunks)
    seq, bc, a, vec, state, states = _specs(length, n, bd, n_chunks)
    seg_state = pl.BlockSpec((None, None, bd, n), lambda i, j, s: (i, s, j, 0))
    f32 = jnp.float32

    def call(mode, out_specs, out_shape, *extra):
        kernel = functools.partial(_fwd_kernel, length=length, chunk=chunk, seg_chunks=seg_chunks,
                                   softplus=softplus, reverse=reverse, has_z=has_z, mode=mode,
                                   save_states=save_states and mode != "summary", layout=cfg.layout,
                                   interpret=interpret)
        return pl.pallas_call(
            kernel, grid=(bsz, dp // bd, segments if mode != "full" else 1),
            in_specs=[seq, seq, seq, bc, bc, a, vec, vec] + [seg_state] * len(extra),
            out_specs=out_specs, out_shape=out_shape, interpret=interpret,
            compiler_params=_params(cfg),
            name="selective_scan_fwd" + ("" if mode == "full" else "_" + mode),
        )(u, delta, z, B, C, A, D, bias, *extra)

    out_shape = jax.ShapeDtypeStruct(u.shape, u.dtype)
    states_shape = [jax.ShapeDtypeStruct((bsz, n_chunks, dp, n), f32)] if save_states else []
    if segments == 1:
        out, last, *saved = call("full", [seq, state] + [states] * save_states,
                                 [out_shape, jax.ShapeDtypeStruct((bsz, dp, n), f32)] + states_shape)
    else:
        end, dt_sum = call("summary",
                           [seg_state, pl.BlockSpec((None, None, bd), lambda i, j, s: (i, s, j))],
                           [jax.ShapeDtypeStruct((bsz, segments, dp, n), f32),
                            jax.ShapeDtypeStruct((bsz, segments, dp), f32)])
        decay = jnp.exp(dt_sum[..., None] * A.astype(f32))  # a segment's whole decay, (b, S, dp, n)

        def combine(h, x):  # over segments in step order: h entering the next segment
            return x[0] * h + x[1], h

        last, entries = jax.lax.scan(combine, jnp.zeros((bsz, dp, n), f32),
                                     (decay.swapaxes(0, 1), end.swapaxes(0, 1)))
        out, *saved = call("emit", [seq] + [states] * save_states, [out_shape] + states_shape,
                           entries.swapaxes(0, 1))
    return out[..., :d], last[:, :d], (saved[0][:, :, :d] if save_states else None)


def backward(u, delta, z, B, C, A, D, bias, states, g, g_last, *, softplus, reverse, has_z,
             chunk, interpret, config: Config | None = None):
    """The gradients (du, ddelta, dz, dB, dC, dA, dD, dbias) of ``forward``'s outputs,
    from its saved ``states``; dA, dD and dbias summed over the batch. dz is not
    meaningful unless has_z."""
    bsz, length, d = u.shape
    n = A.shape[1]
    cfg = check_config("bwd", config or config_for("bwd", bsz, length, d, chunk))
    bd = cfg.block_d
    dp = pl.cdiv(d, bd) * bd
    u, delta, z, g = (_padded(x, 2, dp) for x in (u, delta, z, g))
    A, D, bias = _padded(A, 0, dp), _padded(D, 0, dp), _padded(bias, 0, dp)
    g_last, states = _padded(g_last, 1, dp), _padded(states, 2, dp)
    n_blocks = dp // bd
    n_chunks = states.shape[1]
    seq, bc, a, vec, state, states_spec = _specs(length, n, bd, n_chunks)
    part_bc = pl.BlockSpec((None, None, length, n), lambda i, j: (j, i, 0, 0))
    part_a = pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0))
    part_vec = pl.BlockSpec((None, bd), lambda i, j: (i, j))
    kernel = functools.partial(_bwd_kernel, length=length, chunk=chunk, softplus=softplus,
                               reverse=reverse, has_z=has_z, layout=cfg.layout, interpret=interpret)
    f32 = jnp.float32
    # The lanes kernel's chunk of states, (T + 1, N, BD) a program (bsz * d_inner * (T + 1) * N * 4
    # bytes in all, discarded): written and read back by the same thread a few hundred
    # instructions later, so most reads should hit L2.
    if cfg.layout == "lanes":  # dB and dC in one row of groups of 32, and the chunk of states
        width = pl.cdiv(2 * n, 32) * 32
        sums = ([pl.BlockSpec((None, None, length, width), lambda i, j: (j, i, 0, 0))],
                [jax.ShapeDtypeStruct((n_blocks, bsz, length, width), f32)])
        scratch = ([pl.BlockSpec((None, None, chunk + 1, n, bd), lambda i, j: (i, j, 0, 0, 0))],
                   [jax.ShapeDtypeStruct((bsz, n_blocks, chunk + 1, n, bd), f32)])
    else:
        sums = [part_bc] * 2, [jax.ShapeDtypeStruct((n_blocks, bsz, length, n), f32)] * 2
        scratch = [], []
    du, ddelta, dz, *sums, da, dd, dbias = pl.pallas_call(
        kernel, grid=(bsz, n_blocks),
        in_specs=[seq, seq, seq, bc, bc, a, vec, vec, seq, state, states_spec],
        out_specs=[seq, seq, seq] + sums[0] + [part_a, part_vec, part_vec] + scratch[0],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                   jax.ShapeDtypeStruct(z.shape, z.dtype)] + sums[1] + [
                   jax.ShapeDtypeStruct((bsz, dp, n), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32)] + scratch[1],
        interpret=interpret, compiler_params=_params(cfg), name="selective_scan_bwd",
    )(u, delta, z, B, C, A, D, bias, g, g_last, states)[:len(sums[1]) + 6]
    db, dc = (sums[0][..., :n], sums[0][..., n:2 * n]) if len(sums) == 1 else sums
    return (du[..., :d], ddelta[..., :d], dz[..., :d], db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), da.sum(0)[:d].astype(A.dtype), dd.sum(0)[:d].astype(D.dtype),
            dbias.sum(0)[:d].astype(bias.dtype))
