"""Pallas (Mosaic TPU) selective-scan kernels: states in VMEM, the sequence in blocks.

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

The backward walks the same grid in reverse scan order (the last block of a forward scan
first) with the adjoint of the state, (d_state, channels) float32, in VMEM scratch. Per
chunk it recomputes the chunk's ``chunk`` states from the saved entry state (kept in VMEM
scratch, (chunk, d_state, channels)), then walks them back: lam_t = C_t gy_t + a_{t+1}
lam_{t+1}, and from lam_t and h_t every gradient, the per-step reductions over the state
or over the channels as (1, d_state) x (d_state, LANES) or (1, LANES) x (LANES, d_state)
products on the MXU (HIGHEST). du, ddelta and dz are written per block; dB and dC per block of channels (their
sum over the channels' blocks is XLA's); dA, dD and dbias accumulate in VMEM over the
sequence and are written once per (batch element, channel block), summed over the batch by
XLA. Positions past the end take no part in any sum.
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


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return jax.lax.dot_general(a, b, dims, precision=_HI, preferred_element_type=jnp.float32)


def _chunk_rows(u_ref, dl_ref, b_ref, c_ref, rows, first, bias, *, length, softplus):
    """A chunk's rows as float32 tiles, loaded whole at aligned offsets (Mosaic proves no
    alignment for a single row at a dynamic position): u, delta + bias, B, C, dt (0 past
    the sequence's end: identity steps), dt u and the mask of positions before the end.
    ``first``: the chunk's first position in the sequence."""
    tile = lambda ref: ref[rows, :].astype(jnp.float32)
    u, pre, bm, cm = tile(u_ref), tile(dl_ref) + bias, tile(b_ref), tile(c_ref)
    valid = first + jax.lax.broadcasted_iota(jnp.int32, u.shape, 0) < length
    dt = jnp.where(valid, softplus_formula(pre) if softplus else pre, 0.0)
    return u, pre, bm, cm, dt, dt * u, valid


def _drive(bm, dtu, k):
    """Step k's input to the state, B_k (dt u)_k: (d_state, LANES)."""
    return bm[k:k + 1].reshape(-1, 1) * dtu[k:k + 1]


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
        # The chunk's steps are unrolled, each reading its row of the loaded tiles; its
        # output rows are stored as one tile.
        c = ls // chunk - 1 - j if reverse else j
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        if save_states:
            states_ref[c] = h
        u, _, bm, cm, dt, dtu, _ = _chunk_rows(u_ref, dl_ref, b_ref, c_ref, rows, block * ls + c * chunk, bias,
                                                length=length, softplus=softplus)
        for k in steps:
            h = jnp.exp(dt[k:k + 1] * at) * h + _drive(bm, dtu, k)
            rows_ref[k:k + 1, :] = _dot(cm[k:k + 1], h)
        y = rows_ref[...] + dvec * u
        if has_z:
            z = z_ref[rows, :].astype(jnp.float32)
            y = y * z * sigmoid(z)
        y_ref[rows, :] = y.astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, ls // chunk, chunk_walk, h_ref[...])
    h_ref[...] = h

    @pl.when(s == ns - 1)
    def _():
        last_ref[...] = h


def _grid(length, d, chunk):
    """(positions a block, padded length, padded channels, sequence blocks, channel blocks)."""
    ls = seq_block(length, chunk)
    lp, dp = pl.cdiv(length, ls) * ls, pl.cdiv(d, LANES) * LANES
    return ls, lp, dp, lp // ls, dp // LANES


def _padded_rows(x, lp, width):
    """(b, L, k) zero-padded to (b, lp, width)."""
    return jnp.pad(x, ((0, 0), (0, lp - x.shape[1]), (0, width - x.shape[-1])))


def _padded(args, lp, dp):
    """The kernels' inputs: u, delta, z (b, lp, dp); B, C (b, lp, N); A transposed, (N, dp),
    the channels on the lanes; D and bias (1, dp) float32."""
    u, delta, z, B, C, A, D, bias = args
    vec = lambda x: jnp.pad(x.astype(jnp.float32), (0, dp - x.shape[0])).reshape(1, dp)
    at = jnp.pad(A.astype(jnp.float32).T, ((0, 0), (0, dp - A.shape[0])))
    return (*(_padded_rows(x, lp, dp) for x in (u, delta, z)), *(_padded_rows(x, lp, B.shape[-1]) for x in (B, C)),
            at, vec(D), vec(bias))


def _specs(ls, n, walked):
    """Block specs on the (batch, channel block, grid step) grid: rows of a sequence block
    (ls, LANES); its B or C rows (ls, N); A's (N, LANES); a vector's (1, LANES)."""
    seq = pl.BlockSpec((None, ls, LANES), lambda bi, di, s: (bi, walked(s), di))
    bc = pl.BlockSpec((None, ls, n), lambda bi, di, s: (bi, walked(s), 0))
    par = pl.BlockSpec((n, LANES), lambda bi, di, s: (0, di))
    one = pl.BlockSpec((1, LANES), lambda bi, di, s: (0, di))
    return seq, bc, par, one


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
    ls, lp, dp, ns, nd = _grid(length, d, chunk)
    u_, dl_, z_, b_, c_, at, d_, bias_ = _padded((u, delta, z, B, C, A, D, bias), lp, dp)
    walked = (lambda s: ns - 1 - s) if reverse else (lambda s: s)  # the sequence block at grid step s
    seq, bc, par, one = _specs(ls, n, walked)
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
    )(u_, dl_, z_, b_, c_, at, d_, bias_)
    out, last = outs[0][:, :length, :d], outs[1][:, :, :d].transpose(0, 2, 1)
    states = None
    if save_states:
        states = outs[2][:, :pl.cdiv(length, chunk), :, :d].transpose(0, 1, 3, 2)
    return out, last, states


def _bwd_kernel(u_ref, dl_ref, z_ref, b_ref, c_ref, g_ref, at_ref, d_ref, bias_ref, states_ref, glast_ref,
                du_ref, ddl_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
                lam_ref, acc_a_ref, acc_d_ref, acc_bias_ref, hs_ref, decays_ref, rows_ref, nrows_ref, *,
                length, chunk, softplus, reverse, has_z):
    ls = u_ref.shape[0]
    per = ls // chunk
    s, ns = pl.program_id(2), pl.num_programs(2)
    block = s if reverse else ns - 1 - s  # reverse scan order: a forward scan's last block first

    @pl.when(s == 0)
    def _():
        lam_ref[...] = glast_ref[...].astype(jnp.float32)
        for ref in (acc_a_ref, acc_d_ref, acc_bias_ref):
            ref[...] = jnp.zeros_like(ref)

    at = at_ref[...].astype(jnp.float32)  # (N, LANES)
    dvec = d_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)
    scan_steps = list(range(chunk - 1, -1, -1) if reverse else range(chunk))
    nt = (((1,), (1,)), ((), ()))  # a @ b.T

    def chunk_walk(j, lam):
        c = j if reverse else per - 1 - j  # reverse scan order within the block
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        u, pre, bm, cm, dt, dtu, valid = _chunk_rows(u_ref, dl_ref, b_ref, c_ref, rows, block * ls + c * chunk,
                                                     bias, length=length, softplus=softplus)
        tile = lambda ref: ref[rows, :].astype(jnp.float32)
        g = tile(g_ref)
        if has_z:
            z = tile(z_ref)
            sig = sigmoid(z)
            gy = g * z * sig
        else:
            gy = g
        # The chunk's states from its entry state, in scan order, and each step's decay
        # (computed once: the walk back multiplies the adjoint by it).
        h = states_ref[c]
        for k in scan_steps:
            decays_ref[k] = jnp.exp(dt[k:k + 1] * at)
            h = decays_ref[k] * h + _drive(bm, dtu, k)
            hs_ref[k] = h
        # Back through them: lam is a_{t+1} lam_{t+1} on entry to step t.
        acc_a = acc_a_ref[...]
        for k in reversed(scan_steps):
            h = hs_ref[k]
            lam = cm[k:k + 1].reshape(-1, 1) * gy[k:k + 1] + lam
            w = lam * (h - _drive(bm, dtu, k))  # lam a_t h_{t-1}
            acc_a = acc_a + w * dt[k:k + 1]
            rows_ref[0, k:k + 1, :] = jnp.sum(w * at, axis=0, keepdims=True)  # dL/d dt through a_t
            rows_ref[1, k:k + 1, :] = _dot(bm[k:k + 1], lam)  # <lam, B_t> over the states
            rows_ref[2, k:k + 1, :] = _dot(cm[k:k + 1], h)  # y_t before D and the gate
            nrows_ref[0, k:k + 1, :] = _dot(dtu[k:k + 1], lam, nt)  # dB_t over this block's channels
            nrows_ref[1, k:k + 1, :] = _dot(gy[k:k + 1], h, nt)  # dC_t
            lam = decays_ref[k] * lam
        acc_a_ref[...] = acc_a
        g_dt, lam_b, y = rows_ref[0], rows_ref[1], rows_ref[2]
        du_ref[rows, :] = (dt * lam_b + gy * dvec).astype(du_ref.dtype)
        g_dt = g_dt + u * lam_b
        if softplus:
            g_dt = g_dt * sigmoid(pre)
        g_dt = jnp.where(valid, g_dt, 0.0)  # past the end: lam is not zero there, nothing sums it
        ddl_ref[rows, :] = g_dt.astype(ddl_ref.dtype)
        if has_z:
            dz_ref[rows, :] = (g * (y + dvec * u) * sig * (1 + z * (1 - sig))).astype(dz_ref.dtype)
        else:
            dz_ref[rows, :] = jnp.zeros((chunk, dz_ref.shape[1]), dz_ref.dtype)
        db_ref[rows, :] = nrows_ref[0].astype(db_ref.dtype)
        dc_ref[rows, :] = nrows_ref[1].astype(dc_ref.dtype)
        acc_d_ref[...] += jnp.sum(gy * u, axis=0, keepdims=True)
        acc_bias_ref[...] += jnp.sum(g_dt, axis=0, keepdims=True)
        return lam

    lam_ref[...] = jax.lax.fori_loop(0, per, chunk_walk, lam_ref[...])

    @pl.when(s == ns - 1)
    def _():
        da_ref[...] = acc_a_ref[...]
        dd_ref[...] = acc_d_ref[...]
        dbias_ref[...] = acc_bias_ref[...]


@functools.partial(jax.jit, static_argnames=("softplus", "reverse", "has_z", "chunk", "interpret"))
def backward(u, delta, z, B, C, A, D, bias, states, g, g_last, *, softplus, reverse, has_z, chunk,
             interpret=False):
    """The gradients (du, ddelta, dz, dB, dC, dA, dD, dbias) of ``forward``'s outputs, each
    in its input's shape and dtype: u, delta, z (b, L, d), B, C (b, L, n), A (d, n), D and
    bias (d,); from the chunk-entry ``states`` (b, cdiv(L, chunk), d, n) float32 any backend
    saved, the output's cotangent ``g`` (b, L, d) and the last state's ``g_last`` (b, d, n);
    dA, dD and dbias summed over the batch. dz is zeros unless has_z."""
    bsz, length, d = u.shape
    n = A.shape[1]
    ls, lp, dp, ns, nd = _grid(length, d, chunk)
    u_, dl_, z_, b_, c_, at, d_, bias_ = _padded((u, delta, z, B, C, A, D, bias), lp, dp)
    g_ = _padded_rows(g, lp, dp)
    # The shared (b, chunks, d, n) layout back to the kernel's: the states on the sublanes.
    states_ = jnp.pad(states.transpose(0, 1, 3, 2),
                      ((0, 0), (0, lp // chunk - states.shape[1]), (0, 0), (0, dp - d)))
    glast_ = jnp.pad(g_last.astype(jnp.float32).transpose(0, 2, 1), ((0, 0), (0, 0), (0, dp - d)))

    walked = (lambda s: s) if reverse else (lambda s: ns - 1 - s)  # reverse scan order
    seq, bc, par, one = _specs(ls, n, walked)
    states_spec = pl.BlockSpec((None, ls // chunk, n, LANES), lambda bi, di, s: (bi, walked(s), 0, di))
    per_batch = lambda rows: pl.BlockSpec((None, rows, LANES), lambda bi, di, s: (bi, 0, di))
    part_bc = pl.BlockSpec((None, None, ls, n), lambda bi, di, s: (bi, di, walked(s), 0))
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), x.dtype) for x in (u, delta, z)]
    out_shape += [jax.ShapeDtypeStruct((bsz, nd, lp, n), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((bsz, n, dp), f32), jax.ShapeDtypeStruct((bsz, 1, dp), f32),
                  jax.ShapeDtypeStruct((bsz, 1, dp), f32)]
    kernel = functools.partial(_bwd_kernel, length=length, chunk=chunk, softplus=softplus, reverse=reverse,
                               has_z=has_z)
    du, ddl, dz, db, dc, da, dd, dbias = pl.pallas_call(
        kernel, grid=(bsz, nd, ns),
        in_specs=[seq, seq, seq, bc, bc, seq, par, one, one, states_spec, per_batch(n)],
        out_specs=[seq, seq, seq, part_bc, part_bc, per_batch(n), per_batch(1), per_batch(1)],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((n, LANES), f32), pltpu.VMEM((n, LANES), f32), pltpu.VMEM((1, LANES), f32),
                        pltpu.VMEM((1, LANES), f32), pltpu.VMEM((chunk, n, LANES), f32),
                        pltpu.VMEM((chunk, n, LANES), f32), pltpu.VMEM((3, chunk, LANES), f32),
                        pltpu.VMEM((2, chunk, n), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="selective_scan_bwd_tpu",
    )(u_, dl_, z_, b_, c_, g_, at, d_, bias_, states_, glast_)
    cut = lambda x: x[:, :length, :d]
    return (cut(du), cut(ddl), cut(dz), db.sum(1)[:, :length].astype(B.dtype), dc.sum(1)[:, :length].astype(C.dtype),
            da.sum(0)[:, :d].T.astype(A.dtype), dd.sum((0, 1))[:d].astype(D.dtype),
            dbias.sum((0, 1))[:d].astype(bias.dtype))
