"""Pallas (Triton) selective-scan kernels: fused forward and backward with recomputation.

Imported as ``vim_jax.kernels.selective_scan``; ``vim_jax.scan`` chooses these kernels
for the platforms they are written for. Same layout and semantics as ``vim_jax.scan``
(channels-last; ../shared/design/selective_scan.md).

One program per (batch element, block of BD channels) keeps its (BD, d_state) state in
registers and walks the sequence in chunks of T steps: u, delta, z, B, C are read once
and the output written once; the (B, L, D, N) states never exist in HBM. A chunk's rows
are all loaded before its recurrence starts, so their latency is paid once a chunk, not
once a step (Triton software-pipelines only loads that feed a dot). When differentiated,
the forward also writes the state entering every chunk; the backward walks the chunks
from the end, recomputes a chunk's T states from its entry state into registers and
walks them backwards. A chunk that runs past the sequence's end turns its extra steps
into the identity (dt = 0) and stores nothing for them. dB and dC are reduced over
d_inner outside the kernel from per-block partials, dA, dD and d(delta_bias) from
per-batch partials: no atomics, deterministic results.

``reverse=True`` indexes position L-1-t at step t: no flipped copies. Triton does not
mask loads and stores of a block that overhangs its array (interpret mode pads and
hides it), so no block ever overhangs: every block spans its array's full length, and
d_inner is padded to a multiple of BD in the wrapper when it is not one already
(``test_no_block_overhangs_its_array`` checks every pallas_call). d_state must be a
power of two (Triton tiles); all arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from vim_jax.ops import sigmoid, softplus_formula


class Config(NamedTuple):
    """Launch parameters of one kernel: channels per program, warps, pipeline stages, and
    (forward only) how many segments of the sequence are scanned side by side."""
    block_d: int
    num_warps: int
    num_stages: int
    segments: int = 1


# Measured winners of ``python benchmarks/scan_bench.py --sweep`` on a GPU, keyed by
# (kernel, d_inner, batch, length); shapes not listed use ``default_config``.
TUNED: dict[tuple[str, int, int, int], Config] = {}


# Programs a launch should have to fill a GPU (an H100 has 132 SMs, each holding several).
_PROGRAMS = 512


def default_config(batch: int, length: int, d_inner: int, chunk: int) -> Config:
    """A (BD, 16) float32 state of BD = 32 is 4 registers a thread at 4 warps; smaller
    blocks, and for the forward sequence segments of at least 4 chunks, when the batch
    alone cannot give the GPU a few hundred programs."""
    bd = min(32 if batch * d_inner // 32 >= _PROGRAMS // 2 else 16, pl.next_power_of_2(d_inner))
    programs = batch * pl.cdiv(d_inner, bd)
    segments = max(1, min(pl.cdiv(_PROGRAMS, programs), pl.cdiv(length, chunk) // 4))
    return Config(bd, 4, 1, segments if programs < _PROGRAMS // 2 else 1)


def config_for(kernel: str, batch: int, length: int, d_inner: int, chunk: int) -> Config:
    """The launch parameters used for ``kernel`` ("fwd" or "bwd") at a shape."""
    return TUNED.get((kernel, d_inner, batch, length)) or default_config(batch, length, d_inner, chunk)


def _params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _row(ref, t):
    """Row t of a (L, k) block as a float32 (1, k) tile."""
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _store_row(ref, t, value, valid):
    """Writes row t of a (L, k) block unless this is a step past the sequence's end."""
    @pl.when(valid)
    def _():
        ref[pl.ds(t, 1), :] = value.astype(ref.dtype)


def _chunk_rows(u_ref, delta_ref, others, start, chunk, length, reverse, bias, softplus):
    """The inputs of steps start .. start+chunk-1, all loaded before any is used.

    Per step: (valid, t, u, pre, dt, (a row of each of ``others``)). A step past the end of
    the sequence (the last chunk's tail) reads the last row again and gets dt = 0, which
    makes it the identity on the state; its outputs are never stored.
    """
    rows = []
    for k in range(chunk):
        s = start + k
        valid = s < length
        t = jnp.minimum(s, length - 1)
        t = length - 1 - t if reverse else t
        pre = _row(delta_ref, t) + bias
        dt = jnp.where(valid, softplus_formula(pre) if softplus else pre, 0.0)
        rows.append((valid, t, _row(u_ref, t), pre, dt, tuple(_row(r, t) for r in others)))
    return rows


def _fwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, *refs, length, chunk,
                seg_chunks, softplus, reverse, has_z, mode, save_states):
    """mode "full": the whole sequence from a zero state -> out, last[, states].
    Segments side by side (program_id(2) is the segment, ``seg_chunks`` chunks long):
    "summary" -> each segment's end state from a zero state and its sum of dt;
    "emit" (given each segment's true entry state) -> out[, states]."""
    refs = list(refs)
    entry_ref = refs.pop(0) if mode == "emit" else None
    if mode == "summary":
        end_ref, dtsum_ref = refs
        others = (b_ref,)
    else:
        out_ref, *refs = refs
        last_ref = refs.pop(0) if mode == "full" else None
        others = (b_ref, c_ref) + ((z_ref,) if has_z else ())
    states_ref = refs[0] if save_states else None
    a = a_ref[...].astype(jnp.float32)                      # (BD, N)
    dskip = d_ref[...].astype(jnp.float32)[None, :]         # (1, BD)
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    first = pl.program_id(2) * seg_chunks
    stop = jnp.minimum(first + seg_chunks, pl.cdiv(length, chunk))

    def chunk_body(c, carry):
        h, dt_sum = carry
        if states_ref is not None:  # differentiated: the state entering every chunk
            states_ref[pl.ds(c, 1), :, :] = h[None]
        # A chunk's loads are all issued before its recurrence starts: their latency is
        # paid once a chunk rather than once a step.
        for valid, t, u, _, dt, (b, *cz) in _chunk_rows(u_ref, delta_ref, others, c * chunk, chunk,
                                                        length, reverse, bias, softplus):
            h = jnp.exp(dt.reshape(-1, 1) * a) * h + (dt * u).reshape(-1, 1) * b
            if mode == "summary":
                dt_sum = dt_sum + dt
                continue
            y = jnp.sum(h * cz[0], axis=1)[None, :] + dskip * u
            if has_z:
                y = y * cz[1] * sigmoid(cz[1])
            _store_row(out_ref, t, y, valid)
        return h, dt_sum

    h0 = entry_ref[...] if mode == "emit" else jnp.zeros(a.shape, jnp.float32)
    h, dt_sum = jax.lax.fori_loop(first, stop, chunk_body, (h0, jnp.zeros((1, a.shape[0]), jnp.float32)))
    if mode == "summary":
        end_ref[...] = h
        dtsum_ref[...] = dt_sum[0]
    elif mode == "full":
        last_ref[...] = h


def _bwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, g_ref,
                glast_ref, states_ref,
                du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
                *, length, chunk, softplus, reverse, has_z):
    a = a_ref[...].astype(jnp.float32)
    dskip = d_ref[...].astype(jnp.float32)[None, :]
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    n_chunks = pl.cdiv(length, chunk)
    others = (b_ref, c_ref, g_ref) + ((z_ref,) if has_z else ())

    def chunk_body(i, carry):
        c = n_chunks - 1 - i
        rows = _chunk_rows(u_ref, delta_ref, others, c * chunk, chunk, length, reverse, bias, softplus)
        # The chunk's states, recomputed from its entry state, stay in registers.
        hs = [states_ref[pl.ds(c, 1), :, :][0]]
        for _, _, u, _, dt, (b, *_) in rows:
            hs.append(jnp.exp(dt.reshape(-1, 1) * a) * hs[-1] + (dt * u).reshape(-1, 1) * b)

        lam_next, da_acc, dd_acc, dbias_acc = carry
        for k in reversed(range(chunk)):
            valid, t, u, pre, dt, (b, cc, g, *z) = rows[k]
            h_prev, h = hs[k], hs[k + 1]
            g = jnp.where(valid, g, 0.0)  # a step past the end: no gradient, lam passes on
            y = jnp.sum(h * cc, axis=1)[None, :] + dskip * u
            if has_z:
                sig = sigmoid(z[0])
                gy = g * z[0] * sig
                _store_row(dz_ref, t, g * y * sig * (1.0 + z[0] * (1.0 - sig)), valid)
            else:
                gy = g
            da = jnp.exp(dt.reshape(-1, 1) * a)
            lam = gy.reshape(-1, 1) * cc + lam_next                          # (BD, N)
            lam_ah = lam * da * h_prev
            lam_b = jnp.sum(lam * b, axis=1)[None, :]                        # (1, BD)
            _store_row(dc_ref, t, jnp.sum(gy.reshape(-1, 1) * h, axis=0)[None, :], valid)
            _store_row(db_ref, t, jnp.sum(lam * (dt * u).reshape(-1, 1), axis=0)[None, :], valid)
            _store_row(du_ref, t, gy * dskip + dt * lam_b, valid)
            ddt = u * lam_b + jnp.sum(lam_ah * a, axis=1)[None, :]
            ddelta = jnp.where(valid, ddt * sigmoid(pre) if softplus else ddt, 0.0)
            _store_row(ddelta_ref, t, ddelta, valid)
            da_acc = da_acc + lam_ah * dt.reshape(-1, 1)
            dd_acc = dd_acc + gy * u
            dbias_acc = dbias_acc + ddelta
            lam_next = da * lam
        return lam_next, da_acc, dd_acc, dbias_acc

    zeros_row = jnp.zeros((1, a.shape[0]), jnp.float32)
    carry = (glast_ref[...].astype(jnp.float32), jnp.zeros(a.shape, jnp.float32), zeros_row, zeros_row)
    _, da_acc, dd_acc, dbias_acc = jax.lax.fori_loop(0, n_chunks, chunk_body, carry)
    da_ref[...] = da_acc
    dd_ref[...] = dd_acc[0]
    dbias_ref[...] = dbias_acc[0]


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
            compiler_params=_params(cfg), name="selective_scan_fwd",
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
