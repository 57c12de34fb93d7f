"""Pallas (Triton) selective-scan kernels: fused forward and backward with recomputation.

Imported as ``vim_jax.kernels.selective_scan``; ``vim_jax.mixers.selective_scan`` chooses these kernels
for the platforms they are written for. Same layout and semantics as ``vim_jax.mixers.selective_scan``
(channels-last; the equations are in docs/mixers.md).

One program per (batch element, block of BD channels) keeps its (BD, d_state) state in
registers and walks the sequence: u, delta, z, B, C are read once and the output written
once; the (B, L, D, N) states never exist in HBM. Steps run in loop trips of SUB_BLOCK
unrolled steps whose rows are loaded 1-D before the trip's recurrence (latency paid once
a trip; a loop, so the compiler cannot hoist a whole chunk's rows into registers). When
differentiated, the forward also writes the state entering every chunk of T positions;
chunks are position-aligned in both directions, as the reference backend's are, so
either backend's backward can read either's residual. The backward walks the chunks from
the end of the scan and each chunk in trips from its end, recomputing a trip's entry state
from the chunk's and its SUB_BLOCK states into registers. Full chunks run with no per-step
condition; a partial chunk is a separate, static stretch of code. exp(dt A) is exp2(dt
A log2 e) with A scaled once per program. dB and dC are reduced over d_inner outside the
kernel from per-block partials, dA, dD and d(delta_bias) from per-batch partials: no
atomics, deterministic results. Register use and spills of every configuration the
defaults can choose are checked by ``benchmarks/gpu_compile.py`` (ptxas, sm_80/sm_90).

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

from vim_jax.kernels.activations import sigmoid, softplus_formula


class Config(NamedTuple):
    """Launch parameters of one kernel: channels per program, warps, pipeline stages, and
    (forward only) how many segments of the sequence are scanned side by side."""
    block_d: int
    num_warps: int
    num_stages: int
    segments: int = 1


# Measured winners of ``python benchmarks/scan_bench.py --sweep`` on a GPU, keyed by
# (kernel, d_inner, batch, length); shapes not listed use ``default_config``. A sweep's
# winners file (JSON, its path in $VIM_JAX_SCAN_TUNED) adds to them at import, so the GPU
# suite's later stages run what its sweep found.
TUNED: dict[tuple[str, int, int, int], Config] = {}


def load_tuned(path: str) -> None:
    """Adds the entries of a sweep's winners file, {"fwd,384,128,197": [32, 4, 1, 1], ...};
    a file that cannot be read is reported and ignored (the defaults then apply)."""
    import json
    import warnings

    try:
        with open(path) as f:
            entries = {tuple(k.split(",")): Config(*cfg) for k, cfg in json.load(f).items()}
        TUNED.update({(kernel, *map(int, shape)): cfg for (kernel, *shape), cfg in entries.items()})
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"VIM_JAX_SCAN_TUNED={path}: not a sweep's winners file ({e}); using the defaults")


def save_tuned(path: str, winners: dict[tuple[str, int, int, int], Config]) -> None:
    """Writes ``winners`` in the format ``load_tuned`` reads, whole or not at all (a write
    cut off midway leaves the previous file)."""
    import json

    with open(path + ".tmp", "w") as f:
        json.dump({",".join(map(str, key)): list(cfg) for key, cfg in winners.items()}, f, indent=1)
    os.replace(path + ".tmp", path)


if os.environ.get("VIM_JAX_SCAN_TUNED"):
    load_tuned(os.environ["VIM_JAX_SCAN_TUNED"])


# Programs a launch should have to fill a GPU (an H100 has 132 SMs, each holding several).
_PROGRAMS = 512


# State elements (of a (BD, d_state) tile) a thread may hold without the kernel passing
# 128 registers (16 resident warps per SM) or spilling, as ptxas measured them.
MAX_STATE_PER_THREAD = {"fwd": 4, "bwd": 2}


def spill_free(kernel: str, cfg: Config, d_state: int = 16) -> bool:
    """Whether ``cfg`` keeps ``kernel`` within the measured register budget."""
    per_thread = cfg.block_d * d_state / (32 * cfg.num_warps)
    return 1 <= per_thread <= MAX_STATE_PER_THREAD[kernel] and (kernel == "fwd" or cfg.segments == 1)


def default_config(batch: int, length: int, d_inner: int, chunk: int, kernel: str = "fwd") -> Config:
    """Channel blocks of BD = 16 at as many state elements a thread as ptxas allows without
    spilling (``MAX_STATE_PER_THREAD``: 2 warps forward, 4 backward); then, for the forward,
    sequence segments of at least 4 chunks when the batch alone cannot give the GPU a few
    hundred programs. The sweep of the GPU suite (H200, jax 0.11.2, commit 36c23d5,
    2026-11-27, ``benchmarks/results/gpu_h200/``) found this the fastest at every shape it
    timed: forward 0.48 vs 0.52 ms (batch 128, L 197), 0.50 vs 0.81 ms (32, 1025), 2.47 vs
    2.54 ms (32, 6085), backward 2.20 vs 2.54 ms (128, 197), against BD 32 at 4 and 8 warps."""
    bd = min(16, pl.next_power_of_2(d_inner))
    warps = max(1, bd * 16 // (32 * MAX_STATE_PER_THREAD[kernel]))
    if kernel == "bwd":
        return Config(bd, warps, 1, 1)
    programs = batch * pl.cdiv(d_inner, bd)
    segments = max(1, min(pl.cdiv(_PROGRAMS, programs), pl.cdiv(length, chunk) // 4))
    return Config(bd, warps, 1, segments if programs < _PROGRAMS // 2 else 1)


def config_for(kernel: str, batch: int, length: int, d_inner: int, chunk: int) -> Config:
    """The launch parameters used for ``kernel`` ("fwd" or "bwd") at a shape."""
    return TUNED.get((kernel, d_inner, batch, length)) or default_config(batch, length, d_inner, chunk, kernel)


def _params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# Steps whose rows are loaded together: a chunk is walked in loop trips of this many
# (unrolled) steps, so only that many steps' rows (and, backwards, states) are live at once.
SUB_BLOCK = 4
_LOG2E = 1.4426950408889634


def _rows(refs, t):
    """Row t of each (L, k) block as 1-D float32, (k,): broadcast later with [:, None] or
    [None, :] into the (BD, N) state's layout, never reshaped."""
    return tuple(r[t, :].astype(jnp.float32) for r in refs)


class _Walk(NamedTuple):
    """A program's view of the sequence: per-program constants and how steps map to
    positions and chunks.

    Steps run in scan order (position L-1-s at step s when reversed). Chunks are
    position-aligned in both directions, as the reference backend's saved states are:
    chunk c holds positions c*T .. c*T+T-1, the last one partial (``tail`` positions).
    In step order they are "elements": element e is chunk e (chunk n_chunks-1-e when
    reversed), so the partial chunk is the last element, or the first when reversed.
    """
    a2: jax.Array      # (BD, N) A * log2(e): exp(dt A) = exp2(dt a2)
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

    def dt(self, delta):
        pre = delta + self.bias
        return pre, (softplus_formula(pre) if self.softplus else pre)

    def advance(self, h, dt, u, b):
        return jnp.exp2(dt[:, None] * self.a2) * h + (dt * u)[:, None] * b[None, :]

    def advance_at(self, h, step, u_ref, delta_ref, b_ref):
        u, delta, b = _rows((u_ref, delta_ref, b_ref), self.pos(step))
        return self.advance(h, self.dt(delta)[1], u, b)


def _walk(a_ref, d_ref, bias_ref, softplus, reverse, length, chunk):
    return _Walk(a_ref[...].astype(jnp.float32) * _LOG2E, d_ref[...].astype(jnp.float32),
                 bias_ref[...].astype(jnp.float32), softplus, reverse, length, chunk)


def _groups(first, size, carry, group):
    """``group(step, count, carry)`` over steps first .. first+size-1 in trips of SUB_BLOCK
    steps (a loop, so the compiler cannot hoist every row of a chunk at once) and a
    static remainder."""
    trips, rem = divmod(size, SUB_BLOCK)
    carry = jax.lax.fori_loop(0, trips, lambda g, cr: group(first + g * SUB_BLOCK, SUB_BLOCK, cr), carry)
    return group(first + trips * SUB_BLOCK, rem, carry) if rem else carry


def _fwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, *refs, length, chunk,
                seg_chunks, softplus, reverse, has_z, mode, save_states):
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
    w = _walk(a_ref, d_ref, bias_ref, softplus, reverse, length, chunk)
    gate_refs = (u_ref, delta_ref, b_ref, c_ref) + ((z_ref,) if has_z else ())

    segmented = mode != "full"

    def group(first, count, carry):
        """``count`` steps from ``first``. Segmented, the partial chunk runs as a whole one
        whose steps outside the sequence are identity steps that store nothing: one loop,
        no branch (a separate stretch of code for it made ptxas spill)."""
        h, dt_sum = carry
        steps = [first + k for k in range(count)]
        inside = [jnp.minimum(jnp.maximum(t, 0), length - 1) for t in steps] if segmented else steps
        refs_ = (u_ref, delta_ref, b_ref) if mode == "summary" else gate_refs
        # A trip's loads are issued before its recurrence: latency paid once per trip.
        rows = [_rows(refs_, w.pos(t)) for t in inside]
        for t, t_in, (u, delta, b, *rest) in zip(steps, inside, rows):
            dt = w.dt(delta)[1]
            if segmented:  # outside the sequence: dt = 0 and no input (selects: 0 * inf is NaN)
                dt, u = (jnp.where(jnp.full(x.shape, t == t_in), x, 0.0) for x in (dt, u))
            h = w.advance(h, dt, u, b)
            if mode == "summary":
                dt_sum = dt_sum + dt
                continue
            cc, *z = rest
            y = jnp.sum(h * cc[None, :], axis=1) + w.dskip * u
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
            states_ref[w.chunk_of(e), :, :] = carry[0]
        return _groups(w.start(e, partial), w.tail if partial else chunk, carry, group)

    h0 = entry_ref[...] if mode == "emit" else jnp.zeros(w.a2.shape, jnp.float32)
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
        end_ref[...] = h
        dtsum_ref[...] = dt_sum
    elif mode == "full":
        last_ref[...] = h


def _bwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, g_ref,
                glast_ref, states_ref,
                du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
                *, length, chunk, softplus, reverse, has_z):
    """Walks the elements (``_Walk``) from the last to the first, and each element's steps
    in trips of SUB_BLOCK from its end: a trip's entry state is recomputed from the
    element's saved entry state, its SUB_BLOCK states into registers, then walked
    backwards. A few state tiles are live, never a chunk's."""
    w = _walk(a_ref, d_ref, bias_ref, softplus, reverse, length, chunk)
    grad_refs = (u_ref, delta_ref, b_ref, c_ref, g_ref) + ((z_ref,) if has_z else ())

    def trip(h_first, first, count, carry):
        """The adjoint through steps first .. first+count-1, entered with state h_first."""
        rows = [(w.pos(first + k), _rows(grad_refs, w.pos(first + k))) for k in range(count)]
        hs, steps = [h_first], []
        for t, (u, delta, b, cc, g, *z) in rows:
            pre, dt = w.dt(delta)
            steps.append((t, u, pre, dt, b, cc, g, z))
            hs.append(w.advance(hs[-1], dt, u, b))
        lam_next, da_acc, dd_acc, dbias_acc = carry
        for i in reversed(range(count)):
            t, u, pre, dt, b, cc, g, z = steps[i]
            h_prev, h = hs[i], hs[i + 1]
            y = jnp.sum(h * cc[None, :], axis=1) + w.dskip * u
            if has_z:
                sig = sigmoid(z[0])
                gy = g * z[0] * sig
                dz_ref[t, :] = (g * y * sig * (1.0 + z[0] * (1.0 - sig))).astype(dz_ref.dtype)
            else:
                gy = g
            da = jnp.exp2(dt[:, None] * w.a2)
            lam = gy[:, None] * cc[None, :] + lam_next                      # (BD, N)
            lam_ah = lam * da * h_prev
            lam_b = jnp.sum(lam * b[None, :], axis=1)                        # (BD,)
            dc_ref[t, :] = jnp.sum(gy[:, None] * h, axis=0)
            db_ref[t, :] = jnp.sum(lam * (dt * u)[:, None], axis=0)
            du_ref[t, :] = (gy * w.dskip + dt * lam_b).astype(du_ref.dtype)
            ddt = u * lam_b + jnp.sum(lam_ah * w.a2, axis=1) * (1.0 / _LOG2E)
            ddelta = ddt * sigmoid(pre) if softplus else ddt
            ddelta_ref[t, :] = ddelta.astype(ddelta_ref.dtype)
            da_acc = da_acc + lam_ah * dt[:, None]
            dd_acc = dd_acc + gy * u
            dbias_acc = dbias_acc + ddelta
            lam_next = da * lam
        return lam_next, da_acc, dd_acc, dbias_acc

    def element(e, carry, partial):
        first = w.start(e, partial)
        h_entry = states_ref[w.chunk_of(e), :, :]
        size = w.tail if partial else chunk
        trips, rem = divmod(size, SUB_BLOCK)

        def at(offset):  # the state entering step first + offset, recomputed
            return jax.lax.fori_loop(0, offset, lambda i, h: w.advance_at(h, first + i, u_ref, delta_ref, b_ref),
                                     h_entry)

        if rem:
            carry = trip(at(trips * SUB_BLOCK), first + trips * SUB_BLOCK, rem, carry)

        def back(i, cr):
            offset = (trips - 1 - i) * SUB_BLOCK
            return trip(at(offset), first + offset, SUB_BLOCK, cr)

        return jax.lax.fori_loop(0, trips, back, carry)

    zeros = jnp.zeros(w.dskip.shape, jnp.float32)
    carry = (glast_ref[...].astype(jnp.float32), jnp.zeros(w.a2.shape, jnp.float32), zeros, zeros)
    if w.tail and not reverse:
        carry = element(w.tail_element, carry, True)
    carry = jax.lax.fori_loop(0, w.n_full, lambda i, cr: element(w.first_full + w.n_full - 1 - i, cr, False),
                              carry)
    if w.tail and reverse:
        carry = element(w.tail_element, carry, True)
    _, da_acc, dd_acc, dbias_acc = carry
    da_ref[...] = da_acc
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
    cfg = config or config_for("fwd", bsz, length, d, chunk)
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
                                   save_states=save_states and mode != "summary")
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
    cfg = config or config_for("bwd", bsz, length, d, chunk)
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
                               reverse=reverse, has_z=has_z)
    f32 = jnp.float32
    outs = pl.pallas_call(
        kernel, grid=(bsz, n_blocks),
        in_specs=[seq, seq, seq, bc, bc, a, vec, vec, seq, state, states_spec],
        out_specs=[seq, seq, seq, part_bc, part_bc, part_a, part_vec, part_vec],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                   jax.ShapeDtypeStruct(z.shape, z.dtype),
                   jax.ShapeDtypeStruct((n_blocks, bsz, length, n), f32),
                   jax.ShapeDtypeStruct((n_blocks, bsz, length, n), f32),
                   jax.ShapeDtypeStruct((bsz, dp, n), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32)],
        interpret=interpret, compiler_params=_params(cfg), name="selective_scan_bwd",
    )(u, delta, z, B, C, A, D, bias, g, g_last, states)
    du, ddelta, dz, db, dc, da, dd, dbias = outs
    return (du[..., :d], ddelta[..., :d], dz[..., :d], db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), da.sum(0)[:d].astype(A.dtype), dd.sum(0)[:d].astype(D.dtype),
            dbias.sum(0)[:d].astype(bias.dtype))
