"""Pallas (Mosaic TPU) selective-scan forward: states in VMEM, the sequence in blocks.

Imported as ``vim_jax.kernels.selective_scan_tpu``; ``vim_jax.mixers.selective_scan`` chooses
it where a program is lowered for TPU. Same semantics and residuals as the Triton kernels
(``selective_scan``) and the reference backend (equations: docs/mixers.md).

Layout, as the best TPU scans lay it (apple/axlearn's Mamba kernel,
google-deepmind/recurrentgemma's RG-LRU): a program per (batch element, block of
``LANES`` channels, block of ``seq_block`` positions); the grid's sequence axis is
"arbitrary" (sequential), and the state, (d_state, channels) float32 with the channels on
the vector lanes and the states on the sublanes, stays in VMEM scratch from one sequence
block to the next. Whole-sequence blocks do not fit VMEM at high resolution ((32, 6085,
384) needs 23.8 MiB of scoped VMEM against v5e's 16 MiB default), blocks of 256 positions
do at every size. A chunk's rows of u, delta, z (chunk, channels) and B, C (chunk, d_state)
are read as whole tiles; softplus, dt u, D u and the SiLU gate are computed on the tiles;
each step computes the decay exp(dt A), the state update and the readout
<h, C> as a (1, d_state) x (d_state, channels) matrix product on the MXU at HIGHEST
precision, and the chunk's output rows are written as one tile: nothing of size
(L, d_state, channels) exists anywhere.

``reverse=True`` reads the sequence blocks last to first (a reversed index map) and each
block's steps last to first: no flipped copies. Positions past the sequence's end (the last
block's overhang, padded with zeros) are identity steps (dt forced to 0), so they change
neither the output nor the states in either direction. When differentiated, the kernel
also writes the state entering every chunk of ``chunk`` positions, position-aligned as the
other backends' are, (batch, chunks, d_state, d_inner) in the kernel and transposed to the shared
(batch, chunks, d_inner, d_state) on the way out: any backend's backward reads it.

Not yet written: the Mosaic backward (the backward on TPU is the reference backend's,
reading these states).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vim_jax.kernels.activations import sigmoid, softplus_formula

LANES = 128  # channels a program: one vector register's lanes
SEQ_BLOCK = 256  # positions a program at most (a multiple of every chunk the backends use)
_HI = jax.lax.Precision.HIGHEST


def seq_block(length: int, chunk: int) -> int:
    """Positions a program walks: ``SEQ_BLOCK``, or the whole (chunk-rounded) sequence when
    shorter (a multiple of 8 and of ``chunk``, so blocks are legal and chunk-aligned)."""
    if SEQ_BLOCK % chunk or chunk % 8:
        raise ValueError(f"chunk={chunk} must divide {SEQ_BLOCK} and be a multiple of 8 (a TPU tile's rows)")
    return min(SEQ_BLOCK, pl.cdiv(length, chunk) * chunk)


def _kernel(u_ref, dl_ref, z_ref, b_ref, c_ref, at_ref, d_ref, bias_ref, *refs, length, chunk, softplus,
            reverse, has_z, save_states):
    if save_states:
        y_ref, last_ref, states_ref, h_ref, rows_ref = refs
    else:
        (y_ref, last_ref, h_ref, rows_ref), states_ref = refs, None
    ls = y_ref.shape[0]
    s, ns = pl.program_id(2), pl.num_programs(2)
    block = ns - 1 - s if reverse else s  # the sequence block this program walks

    @pl.when(s == 0)
    def _():
        h_ref[...] = jnp.zeros_like(h_ref)

    at = at_ref[...].astype(jnp.float32)  # (N, LANES)
    dvec = d_ref[...].astype(jnp.float32)  # (1, LANES)
    bias = bias_ref[...].astype(jnp.float32)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)

    def chunk_walk(j, h):
        # A chunk's rows are loaded and stored as whole (chunk, LANES) tiles at aligned
        # offsets (Mosaic proves no alignment for a single row at a dynamic position); the
        # steps within it are unrolled, each reading its row of the loaded tiles.
        c = ls // chunk - 1 - j if reverse else j
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        if save_states:
            states_ref[c] = h
        tile = lambda ref: ref[rows, :].astype(jnp.float32)
        u, x, bm, cm = tile(u_ref), tile(dl_ref) + bias, tile(b_ref), tile(c_ref)
        dt = softplus_formula(x) if softplus else x
        pos = block * ls + c * chunk + jax.lax.broadcasted_iota(jnp.int32, dt.shape, 0)
        dt = jnp.where(pos < length, dt, 0.0)  # past the end: identity steps
        dtu = dt * u
        for k in steps:
            h = jnp.exp(dt[k:k + 1] * at) * h + bm[k:k + 1].reshape(-1, 1) * dtu[k:k + 1]
            rows_ref[k:k + 1, :] = jax.lax.dot_general(cm[k:k + 1], h, (((1,), (0,)), ((), ())), precision=_HI,
                                                       preferred_element_type=jnp.float32)
        y = rows_ref[...] + dvec * u
        if has_z:
            z = tile(z_ref)
            y = y * z * sigmoid(z)
        y_ref[rows, :] = y.astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, ls // chunk, chunk_walk, h_ref[...])
    h_ref[...] = h

    @pl.when(s == ns - 1)
    def _():
        last_ref[...] = h


@functools.partial(jax.jit, static_argnames=("softplus", "reverse", "has_z", "chunk", "save_states",
                                             "interpret"))
def forward(u, delta, z, B, C, A, D, bias, *, softplus, reverse, has_z, chunk, save_states,
            interpret=False):
    """(out (b, L, d) in u's dtype, last state (b, d, n) float32, states or None): the
    Triton kernels' ``forward``, for TPU. states: (b, cdiv(L, chunk), d, n) float32, the
    state entering every chunk (only when ``save_states``). ``interpret``: False, or
    ``pltpu.InterpretParams`` (TPU interpret mode on the CPU)."""
    bsz, length, d = u.shape
    n = A.shape[1]
    ls = seq_block(length, chunk)
    lp, dp = pl.cdiv(length, ls) * ls, pl.cdiv(d, LANES) * LANES
    ns, nd = lp // ls, dp // LANES
    pad = lambda x, lanes: jnp.pad(x, ((0, 0), (0, lp - length), (0, lanes - x.shape[-1])))
    u_, dl_, z_ = (pad(x, dp) for x in (u, delta, z))
    b_, c_ = (pad(x, n) for x in (B, C))
    vec = lambda x: jnp.pad(x.astype(jnp.float32), (0, dp - d)).reshape(1, dp)
    at = jnp.pad(A.astype(jnp.float32).T, ((0, 0), (0, dp - d)))  # (N, dp): channels on lanes

    walked = (lambda s: ns - 1 - s) if reverse else (lambda s: s)  # the sequence block at grid step s
    seq = pl.BlockSpec((None, ls, LANES), lambda bi, di, s: (bi, walked(s), di))
    bc = pl.BlockSpec((None, ls, n), lambda bi, di, s: (bi, walked(s), 0))
    par = pl.BlockSpec((n, LANES), lambda bi, di, s: (0, di))
    one = pl.BlockSpec((1, LANES), lambda bi, di, s: (0, di))
    out_specs = [seq, pl.BlockSpec((None, n, LANES), lambda bi, di, s: (bi, 0, di))]
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), u.dtype), jax.ShapeDtypeStruct((bsz, n, dp), jnp.float32)]
    if save_states:
        per = ls // chunk
        out_specs.append(pl.BlockSpec((None, per, n, LANES), lambda bi, di, s: (bi, walked(s), 0, di)))
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp // chunk, n, dp), jnp.float32))
    kernel = functools.partial(_kernel, length=length, chunk=chunk, softplus=softplus, reverse=reverse,
                               has_z=has_z, save_states=save_states)
    outs = pl.pallas_call(
        kernel, grid=(bsz, nd, ns), in_specs=[seq, seq, seq, bc, bc, par, one, one],
        out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((n, LANES), jnp.float32), pltpu.VMEM((chunk, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="selective_scan_fwd_tpu",
    )(u_, dl_, z_, b_, c_, at, vec(D), vec(bias))
    out, last = outs[0][:, :length, :d], outs[1][:, :, :d].transpose(0, 2, 1)
    states = None
    if save_states:
        states = outs[2][:, :pl.cdiv(length, chunk), :, :d].transpose(0, 1, 3, 2)
    return out, last, states
