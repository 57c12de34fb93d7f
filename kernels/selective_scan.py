"""Pallas (Triton) selective-scan kernels: fused forward and backward with recomputation.

Imported as ``vim_jax.kernels.selective_scan``; ``vim_jax.scan`` chooses these kernels
for the platforms they are written for. Same layout and semantics as ``vim_jax.scan``
(channels-last; ../shared/design/selective_scan.md).

One program per (batch element, block of BD channels) keeps its (BD, d_state) state in
registers and loops over the sequence: u, delta, z, B, C are read once and the output
written once; the (B, L, D, N) states never exist in HBM. Each step loads the next
step's rows before it computes, so the loads are in flight during the recurrence
(Triton pipelines only loads that feed a dot). When differentiated, the forward also
writes the state at the start of every chunk of T steps; the backward walks the chunks
from the end, recomputes a chunk's T states from its entry state into a per-program
scratch (T * BD * N floats, L2-resident at T = 16) and walks them backwards. dB and dC
are reduced over d_inner outside the kernel from per-block partials, dA, dD and
d(delta_bias) from per-batch partials: no atomics, deterministic results.

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

from vim_jax.ops import softplus_formula


class Config(NamedTuple):
    """Launch parameters of one kernel: channels per program, warps, pipeline stages."""
    block_d: int
    num_warps: int
    num_stages: int


# Measured winners of ``python benchmarks/scan_bench.py --sweep`` on a GPU, keyed by
# (kernel, d_inner, batch, length); shapes not listed use ``default_config``.
TUNED: dict[tuple[str, int, int, int], Config] = {}


def default_config(batch: int, length: int, d_inner: int) -> Config:
    """A (BD, 16) float32 state of BD = 32 is 4 registers a thread at 4 warps; smaller
    blocks when the batch alone cannot give the GPU a few hundred programs."""
    bd = 32 if batch * d_inner // 32 >= 256 else 16
    return Config(min(bd, pl.next_power_of_2(d_inner)), 4, 1)


def config_for(kernel: str, batch: int, length: int, d_inner: int) -> Config:
    """The launch parameters used for ``kernel`` ("fwd" or "bwd") at a shape."""
    return TUNED.get((kernel, d_inner, batch, length)) or default_config(batch, length, d_inner)


def _params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _row(ref, t):
    """Row t of a (L, k) block as a float32 (1, k) tile."""
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _fwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, out_ref, last_ref,
                *states_ref, length, chunk, softplus, reverse, has_z):
    a = a_ref[...].astype(jnp.float32)                      # (BD, N)
    dskip = d_ref[...].astype(jnp.float32)[None, :]         # (1, BD)
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    pos = (lambda s: length - 1 - s) if reverse else (lambda s: s)

    def load(s):
        t = pos(jnp.minimum(s, length - 1))  # the last step prefetches its own row again
        rows = (_row(u_ref, t), _row(delta_ref, t), _row(b_ref, t), _row(c_ref, t))
        return rows + ((_row(z_ref, t),) if has_z else ())

    def step(s, carry):
        h, rows = carry
        following = load(s + 1)  # issued before this step's arithmetic needs its own rows
        u, dt, b, c = rows[:4]
        dt = dt + bias
        dt = softplus_formula(dt) if softplus else dt
        h = jnp.exp(dt.reshape(-1, 1) * a) * h + (dt * u).reshape(-1, 1) * b
        y = jnp.sum(h * c, axis=1)[None, :] + dskip * u
        if has_z:
            z = rows[4]
            y = y * z * _sigmoid(z)
        out_ref[pl.ds(pos(s), 1), :] = y.astype(out_ref.dtype)
        return h, following

    carry = (jnp.zeros(a.shape, jnp.float32), load(0))
    if states_ref:  # differentiated: the state entering every chunk, for the backward
        def chunk_body(c, carry):
            states_ref[0][pl.ds(c, 1), :, :] = carry[0][None]
            return jax.lax.fori_loop(c * chunk, jnp.minimum((c + 1) * chunk, length), step, carry)

        carry = jax.lax.fori_loop(0, pl.cdiv(length, chunk), chunk_body, carry)
    else:
        carry = jax.lax.fori_loop(0, length, step, carry)
    last_ref[...] = carry[0]


def _bwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, g_ref,
                glast_ref, states_ref,
                du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, hbuf_ref,
                *, length, chunk, softplus, reverse, has_z, barrier):
    a = a_ref[...].astype(jnp.float32)
    dskip = d_ref[...].astype(jnp.float32)[None, :]
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    n_chunks = pl.cdiv(length, chunk)
    pos = (lambda s: length - 1 - s) if reverse else (lambda s: s)

    def inputs(t):
        u = _row(u_ref, t)
        pre = _row(delta_ref, t) + bias
        dt = softplus_formula(pre) if softplus else pre
        return u, pre, dt, _row(b_ref, t), _row(c_ref, t)

    def chunk_body(i, carry):
        c = n_chunks - 1 - i
        start = c * chunk
        stop = jnp.minimum(start + chunk, length)
        h_entry = states_ref[pl.ds(c, 1), :, :][0]
        # The scratch is written and read back by all threads of the program: order the
        # previous chunk's reads before these writes, and these writes before the reads.
        sync = plt.debug_barrier if barrier else (lambda: None)
        sync()

        def recompute(s, h):
            u, _, dt, b, _ = inputs(pos(s))
            h = jnp.exp(dt.reshape(-1, 1) * a) * h + (dt * u).reshape(-1, 1) * b
            hbuf_ref[pl.ds(s - start, 1), :, :] = h[None]
            return h

        jax.lax.fori_loop(start, stop, recompute, h_entry)
        sync()

        def step(k, carry):
            lam_next, da_acc, dd_acc, dbias_acc = carry
            s = stop - 1 - k
            t = pos(s)
            u, pre, dt, b, cc = inputs(t)
            h = hbuf_ref[pl.ds(s - start, 1), :, :][0]
            h_prev = jnp.where(s == start, h_entry,
                               hbuf_ref[pl.ds(jnp.maximum(s - start - 1, 0), 1), :, :][0])
            y = jnp.sum(h * cc, axis=1)[None, :] + dskip * u
            g = _row(g_ref, t)
            if has_z:
                z = _row(z_ref, t)
                sig = _sigmoid(z)
                gy = g * z * sig
                dz_ref[pl.ds(t, 1), :] = (g * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
            else:
                gy = g
            da = jnp.exp(dt.reshape(-1, 1) * a)
            lam = gy.reshape(-1, 1) * cc + lam_next                          # (BD, N)
            lam_ah = lam * da * h_prev
            lam_b = jnp.sum(lam * b, axis=1)[None, :]                        # (1, BD)
            dc_ref[pl.ds(t, 1), :] = jnp.sum(gy.reshape(-1, 1) * h, axis=0)[None, :]
            db_ref[pl.ds(t, 1), :] = jnp.sum(lam * (dt * u).reshape(-1, 1), axis=0)[None, :]
            du_ref[pl.ds(t, 1), :] = (gy * dskip + dt * lam_b).astype(du_ref.dtype)
            ddt = u * lam_b + jnp.sum(lam_ah * a, axis=1)[None, :]
            ddelta = ddt * _sigmoid(pre) if softplus else ddt
            ddelta_ref[pl.ds(t, 1), :] = ddelta.astype(ddelta_ref.dtype)
            da_acc = da_acc + lam_ah * dt.reshape(-1, 1)
            return da * lam, da_acc, dd_acc + gy * u, dbias_acc + ddelta

        return jax.lax.fori_loop(0, stop - start, step, carry)

    zeros_row = jnp.zeros((1, a.shape[0]), jnp.float32)
    carry = (glast_ref[...].astype(jnp.float32), jnp.zeros(a.shape, jnp.float32), zeros_row, zeros_row)
    _, da_acc, dd_acc, dbias_acc = jax.lax.fori_loop(0, n_chunks, chunk_body, carry)
    da_ref[...] = da_acc
    dd_ref[...] = dd_acc[0]
    dbias_ref[...] = dbias_acc[0]


def _specs(length, n, bd, n_chunks):
    seq = pl.BlockSpec((None, length, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, length, n), lambda i, j: (i, 0, 0))
    a = pl.BlockSpec((bd, n), lambda i, j: (j, 0))
    vec = pl.BlockSpec((bd,), lambda i, j: (j,))
    state = pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0))
    states = pl.BlockSpec((None, n_chunks, bd, n), lambda i, j: (i, 0, j, 0))
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
    """
    bsz, length, d = u.shape
    n = A.shape[1]
    cfg = config or config_for("fwd", bsz, length, d)
    bd = cfg.block_d
    dp = pl.cdiv(d, bd) * bd  # no block may overhang: pad the channels when d needs it
    u, delta, z = (_padded(x, 2, dp) for x in (u, delta, z))
    A, D, bias = _padded(A, 0, dp), _padded(D, 0, dp), _padded(bias, 0, dp)
    n_chunks = pl.cdiv(length, chunk)
    seq, bc, a, vec, state, states = _specs(length, n, bd, n_chunks)
    out_specs = [seq, state] + ([states] if save_states else [])
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((bsz, dp, n), jnp.float32)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((bsz, n_chunks, dp, n), jnp.float32))
    kernel = functools.partial(_fwd_kernel, length=length, chunk=chunk, softplus=softplus,
                               reverse=reverse, has_z=has_z)
    outs = pl.pallas_call(
        kernel, grid=(bsz, dp // bd),
        in_specs=[seq, seq, seq, bc, bc, a, vec, vec], out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=_params(cfg), name="selective_scan_fwd",
    )(u, delta, z, B, C, A, D, bias)
    out, last = outs[0][..., :d], outs[1][:, :d]
    return out, last, (outs[2][:, :, :d] if save_states else None)


def backward(u, delta, z, B, C, A, D, bias, states, g, g_last, *, softplus, reverse, has_z,
             chunk, interpret, config: Config | None = None):
    """The gradients (du, ddelta, dz, dB, dC, dA, dD, dbias) of ``forward``'s outputs,
    from its saved ``states``; dA, dD and dbias summed over the batch. dz is not
    meaningful unless has_z."""
    bsz, length, d = u.shape
    n = A.shape[1]
    cfg = config or config_for("bwd", bsz, length, d)
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
    scratch = pl.BlockSpec((None, None, chunk, bd, n), lambda i, j: (i, j, 0, 0, 0))
    kernel = functools.partial(_bwd_kernel, length=length, chunk=chunk, softplus=softplus,
                               reverse=reverse, has_z=has_z, barrier=not interpret)
    f32 = jnp.float32
    outs = pl.pallas_call(
        kernel, grid=(bsz, n_blocks),
        in_specs=[seq, seq, seq, bc, bc, a, vec, vec, seq, state, states_spec],
        out_specs=[seq, seq, seq, part_bc, part_bc, part_a, part_vec, part_vec, scratch],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                   jax.ShapeDtypeStruct(z.shape, z.dtype),
                   jax.ShapeDtypeStruct((n_blocks, bsz, length, n), f32),
                   jax.ShapeDtypeStruct((n_blocks, bsz, length, n), f32),
                   jax.ShapeDtypeStruct((bsz, dp, n), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32),
                   jax.ShapeDtypeStruct((bsz, dp), f32),
                   jax.ShapeDtypeStruct((bsz, n_blocks, chunk, bd, n), f32)],
        interpret=interpret, compiler_params=_params(cfg), name="selective_scan_bwd",
    )(u, delta, z, B, C, A, D, bias, g, g_last, states)
    du, ddelta, dz, db, dc, da, dd, dbias, _ = outs
    return (du[..., :d], ddelta[..., :d], dz[..., :d], db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), da.sum(0)[:d].astype(A.dtype), dd.sum(0)[:d].astype(D.dtype),
            dbias.sum(0)[:d].astype(bias.dtype))
