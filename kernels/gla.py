"""Pallas (Triton) gated-linear-attention kernels: chunked forward and backward.

Imported as ``vim_jax.kernels.gla``; ``vim_jax.mixers.gla`` chooses them for the platforms
they are written for. Semantics and layout are ``vim_jax.mixers.gla``'s; the chunked
equations are in docs/mixers.md.

One program per (batch entry, head, direction) keeps the (dk, dv) float32 state in
registers and walks the sequence in chunks of ``CHUNK`` rows: within a chunk, matrix
products (every operand dimension >= 16, so they run on matrix units); between chunks, the
state recurrence. Both directions of ViG's mixer run in one launch (the grid's third axis)
on the same q, k, v, each with its own gates: no flipped or doubled copy is ever written.
Gates and outputs carry a direction axis, (batch, length, directions, heads, dim), which is
how the model's gate projection lays them out already.

Every exponent is <= 0: the decay between rows i and j of a chunk is exp(b_i - b_j) with b
the in-chunk cumulative gate, computed element-wise over (C, C, dk) and masked before the
exp; never exp(b_i) * exp(-b_j), which overflows for strong gates. In-chunk cumulative sums
are products with a triangular matrix of ones (Triton has no reverse cumsum).

No block overhangs its array (Triton would not mask it): every block spans the full
length, and chunks are read with in-bounds dynamic slices. When the length is not a
multiple of C, the chunk that would overhang is read shifted back to end at the array's
end (forward; it starts at 0 in reverse): its rows that an earlier chunk already covered
are zeroed on load (a zero key and zero gate are an identity step) and not stored. Lengths
below C are zero-padded by the wrapper.

The differentiated forward also writes the state entering every chunk, (batch, directions,
heads, chunks, dk, dv) float32, from which the backward walks the chunks in reverse scan
order, carrying the state's adjoint and the running sum that gives the gates' gradient:
dg = (reverse) cumulative sum of q * dq - k * dk, plus the final state's own term. Either
walk can run in two phases (``Config.two_phase``): a walk carrying the state (or its
adjoint) alone, then a launch of one program per chunk; the backward's dg then adds each
chunk's share of the later chunks' sums outside the kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from vim_jax.kernels import tuning

CHUNK = 16
_HI = jax.lax.Precision.HIGHEST  # IEEE float32 products in Triton (not TF32)


class Config(NamedTuple):
    """Launch parameters: warps and pipeline stages of one program; and whether the kernel
    runs in two phases (``two_phase``, flash-linear-attention's "chunk" mode: forward, one
    walk over the chunks for their entry states, then every chunk's outputs from them in
    parallel; backward, one walk back for the adjoint of the state leaving every chunk, then
    every chunk's gradients in parallel) or as one walk that does it all (its "fused_chunk"
    mode, the default: the one a GPU has timed)."""
    num_warps: int
    num_stages: int = 1
    two_phase: bool = False


def default_config(dk: int, dv: int, kernel: str) -> Config:
    """Warps per program, from ``benchmarks/gpu_compile.py`` (ptxas, sm_90, bfloat16):
    the forward at 8 warps holds 128 registers (109 at ViG-H's 16/32), no spill, 16
    resident warps per SM (at 4 warps: 217 registers). The backward holds three (C, C, dk)
    tiles: at ViG-H's 16/32, 16 warps fit in 128 registers; at ViG-T's 32/64, 16 warps
    spill 88 bytes, so 8 warps at 255 registers, no spill, 8 resident warps per SM."""
    if kernel == "fwd":
        return Config(8)
    return Config(16 if dk * dv <= 512 else 8)


# Measured choices of the GPU suite's gla stage (``benchmarks/gla_bench.py --tuned-out``),
# keyed by (kernel, dk, dv, length); shapes not listed use ``default_config``. A winners file
# (``tuning``, its path in $VIM_JAX_GLA_TUNED) adds to them at import, so the suite's later
# stages run the form of each kernel (one walk or two phases) its timing found faster.
TUNED: dict[tuple[str, int, int, int], Config] = tuning.from_environment("VIM_JAX_GLA_TUNED", Config)


def config_for(kernel: str, dk: int, dv: int, length: int) -> Config:
    """The launch parameters used for ``kernel`` ("fwd" or "bwd") at a shape."""
    return TUNED.get((kernel, dk, dv, length)) or default_config(dk, dv, kernel)


def block_size(d: int) -> int:
    """The tile a head size of ``d`` runs at: the next power of two, at least 16 (Triton
    tiles are powers of two, and matrix-unit operands at least 16 wide). The mixer pads
    q, k, g and v with zeros to it: a zero key channel with a zero gate adds nothing to
    the state, and a zero value column gives a zero output column."""
    return max(16, pl.next_power_of_2(d))


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=(_HI, _HI), preferred_element_type=jnp.float32)


class _Chunks(NamedTuple):
    """How scan-order chunk c maps to rows of the arrays, for one direction."""
    length: int
    reverse: jax.Array  # scalar bool: dynamic when one launch runs both directions

    @property
    def n(self):
        return pl.cdiv(self.length, CHUNK)

    def rows(self, c):
        """(start, new): the chunk's first row and which of its C rows are its own (the rest
        were covered by the previous chunk in scan order when it is read shifted)."""
        fwd_start = jnp.minimum(c * CHUNK, self.length - CHUNK)
        rev_start = jnp.maximum(self.length - (c + 1) * CHUNK, 0)
        start = jnp.where(self.reverse, rev_start, fwd_start)
        pos = start + jnp.arange(CHUNK, dtype=jnp.int32)
        new = jnp.where(self.reverse, pos < self.length - c * CHUNK, pos >= c * CHUNK)
        return start, new

    def order(self):
        """(C, C) bool, True where row j precedes or is row i in scan order."""
        i = jnp.arange(CHUNK, dtype=jnp.int32)[:, None]
        j = jnp.arange(CHUNK, dtype=jnp.int32)[None, :]
        return jnp.where(self.reverse, j >= i, j <= i)


def _load(refs, start, new):
    """The chunk's rows of each (L, d) ref as float32, rows not its own zeroed."""
    return tuple(jnp.where(new[:, None], r[pl.ds(start, CHUNK), :].astype(jnp.float32), 0.0) for r in refs)


def _store(ref, start, new, x):
    plt.store(ref.at[pl.ds(start, CHUNK), :], x.astype(ref.dtype),
              mask=jnp.broadcast_to(new[:, None], x.shape))


def _decay(order, cum):
    """(C, C, dk): exp(b_i - b_j) where j precedes or is i in scan order, else 0; the
    select comes before the exp, so no positive exponent is ever taken."""
    diff = cum[:, None, :] - cum[None, :, :]
    return jnp.exp(jnp.where(order[:, :, None], diff, -jnp.inf))


def _outputs(order, q, k, v, cum, state):
    """A chunk's outputs (before the scale) from its entry state and its own rows."""
    scores = jnp.sum(q[:, None, :] * k[None, :, :] * _decay(order, cum), axis=2)  # (C, C)
    return _dot(q * jnp.exp(cum), state) + _dot(scores, v)


def _advance(state, k, v, cum, total):
    """The state leaving a chunk from the one entering it."""
    carried = k * jnp.exp(total[None, :] - cum)
    return jnp.exp(total)[:, None] * state + _dot(carried, v, trans_a=True)


def _direction(directions):
    if len(directions) == 1:
        return jnp.asarray(directions[0])
    return pl.program_id(2) == 1


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, *refs, length, scale, directions, save_states):
    o_ref, last_ref, *states_ref = refs
    ch = _Chunks(length, _direction(directions))
    order = ch.order()
    tri = order.astype(jnp.float32)

    def chunk(c, state):
        start, new = ch.rows(c)
        q, k, v, g = _load((q_ref, k_ref, v_ref, g_ref), start, new)
        cum = _dot(tri, g)                        # b_i: the decay from the chunk's entry to row i
        total = jnp.sum(g, axis=0)                # b at the chunk's last row in scan order
        _store(o_ref, start, new, scale * _outputs(order, q, k, v, cum, state))
        if save_states:
            states_ref[0][c, :, :] = state
        return _advance(state, k, v, cum, total)

    dk, dv = q_ref.shape[1], v_ref.shape[1]
    last_ref[...] = jax.lax.fori_loop(0, ch.n, chunk, jnp.zeros((dk, dv), jnp.float32))


def _states_kernel(k_ref, v_ref, g_ref, last_ref, states_ref, *, length, directions):
    """Phase one of the two-phase forward: the walk over the chunks with the state alone (no
    queries, no (C, C) scores), writing the state entering every chunk and the last."""
    ch = _Chunks(length, _direction(directions))
    tri = ch.order().astype(jnp.float32)

    def chunk(c, state):
        start, new = ch.rows(c)
        k, v, g = _load((k_ref, v_ref, g_ref), start, new)
        states_ref[c, :, :] = state
        return _advance(state, k, v, _dot(tri, g), jnp.sum(g, axis=0))

    dk, dv = k_ref.shape[1], v_ref.shape[1]
    last_ref[...] = jax.lax.fori_loop(0, ch.n, chunk, jnp.zeros((dk, dv), jnp.float32))


def _program_chunk(length, directions, n_chunks):
    """(_Chunks, chunk) of a two-phase kernel's per-chunk program: the grid's third axis is
    (direction, chunk), direction rc // n_chunks and chunk rc % n_chunks."""
    rc = pl.program_id(2)
    reverse = (rc >= n_chunks) if len(directions) == 2 else jnp.asarray(directions[0])
    return _Chunks(length, reverse), rc % n_chunks


def _outputs_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, o_ref, *, length, scale, directions, n_chunks):
    """Phase two: one program per (batch, head, direction and chunk) computes the chunk's
    outputs from its entry state, independently of every other chunk."""
    ch, c = _program_chunk(length, directions, n_chunks)
    order = ch.order()
    start, new = ch.rows(c)
    q, k, v, g = _load((q_ref, k_ref, v_ref, g_ref), start, new)
    cum = _dot(order.astype(jnp.float32), g)
    _store(o_ref, start, new, scale * _outputs(order, q, k, v, cum, states_ref[c, :, :]))


def _chunk_grads(order, tri, q, k, v, g, do, state, ds):
    """One chunk's dq, dk, dv and its rows' q dq - k dk (whose sums from the end give dg),
    from the state entering it and the adjoint ``ds`` of the state leaving it; with the
    chunk's total gate and in-chunk decays for the walk back to the previous chunk."""
    cum = _dot(tri, g)
    total = jnp.sum(g, axis=0)
    decay = _decay(order, cum)
    qk = q[:, None, :] * k[None, :, :] * decay
    scores = jnp.sum(qk, axis=2)                          # A_ij
    dscores = jnp.where(order, _dot(do, v, trans_b=True), 0.0)  # dO_i . v_j
    weighted = dscores[:, :, None] * decay
    q_decay, k_decay = jnp.exp(cum), jnp.exp(total[None, :] - cum)
    dq = q_decay * _dot(do, state, trans_b=True) + jnp.sum(weighted * k[None, :, :], axis=1)
    dk = k_decay * _dot(v, ds, trans_b=True) + jnp.sum(weighted * q[:, None, :], axis=0)
    dv = _dot(scores, do, trans_a=True) + _dot(k * k_decay, ds)
    return dq, dk, dv, q * dq - k * dk, total, q_decay


def _walk_back(ds, q, do, total, q_decay):
    """The adjoint of the state entering a chunk from the one leaving it."""
    return jnp.exp(total)[:, None] * ds + _dot(q * q_decay, do, trans_a=True)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, do_ref, dlast_ref, dg0_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, *, length, scale, directions):
    ch = _Chunks(length, _direction(directions))
    order = ch.order()
    tri = order.astype(jnp.float32)

    def chunk(i, carry):
        ds, dg_sum = carry  # the adjoint of the state leaving chunk c; sum of q dq - k dk after it
        c = ch.n - 1 - i
        start, new = ch.rows(c)
        q, k, v, g, do = _load((q_ref, k_ref, v_ref, g_ref, do_ref), start, new)
        do = scale * do
        dq, dk, dv, term, total, q_decay = _chunk_grads(order, tri, q, k, v, g, do, states_ref[c, :, :], ds)
        dg = dg_sum[None, :] + _dot(tri, term, trans_a=True)  # sum over rows at or after i
        for ref, x in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dg_ref, dg)):
            _store(ref, start, new, x)
        return _walk_back(ds, q, do, total, q_decay), dg_sum + jnp.sum(term, axis=0)

    jax.lax.fori_loop(0, ch.n, chunk, (dlast_ref[...].astype(jnp.float32),
                                       dg0_ref[...].astype(jnp.float32)))


def _bwd_states_kernel(q_ref, g_ref, do_ref, dlast_ref, dstates_ref, *, length, scale, directions):
    """Phase one of the two-phase backward: the walk back over the chunks with the state's
    adjoint alone (no keys, values or (C, C) scores), writing the adjoint of the state
    leaving every chunk."""
    ch = _Chunks(length, _direction(directions))
    tri = ch.order().astype(jnp.float32)

    def chunk(i, ds):
        c = ch.n - 1 - i
        start, new = ch.rows(c)
        q, g, do = _load((q_ref, g_ref, do_ref), start, new)
        dstates_ref[c, :, :] = ds
        cum = _dot(tri, g)
        return _walk_back(ds, q, scale * do, jnp.sum(g, axis=0), jnp.exp(cum))

    jax.lax.fori_loop(0, ch.n, chunk, dlast_ref[...].astype(jnp.float32))


def _bwd_chunks_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, dstates_ref, do_ref,
                       dq_ref, dk_ref, dv_ref, dg_ref, sums_ref, *, length, scale, directions, n_chunks):
    """Phase two: one program per (batch, head, direction and chunk) computes the chunk's
    gradients from its entry state and its leaving adjoint; dg within the chunk only, with
    the chunk's sum of q dq - k dk, from which the wrapper adds what the later chunks give."""
    ch, c = _program_chunk(length, directions, n_chunks)
    order = ch.order()
    tri = order.astype(jnp.float32)
    start, new = ch.rows(c)
    q, k, v, g, do = _load((q_ref, k_ref, v_ref, g_ref, do_ref), start, new)
    dq, dk, dv, term, _, _ = _chunk_grads(order, tri, q, k, v, g, scale * do, states_ref[c, :, :],
                                          dstates_ref[c, :, :])
    for ref, x in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dg_ref, _dot(tri, term, trans_a=True))):
        _store(ref, start, new, x)
    sums_ref[...] = jnp.sum(term, axis=0)


def _specs(length, dk, dv, n_chunks):
    """Blocks for the grid (batch, head, direction): (L, d) rows of one head, one direction."""
    shared = lambda d: pl.BlockSpec((None, length, None, d), lambda b, h, r: (b, 0, h, 0))
    per_dir = lambda d: pl.BlockSpec((None, length, None, None, d), lambda b, h, r: (b, 0, r, h, 0))
    state = pl.BlockSpec((None, None, None, dk, dv), lambda b, h, r: (b, r, h, 0, 0))
    states = pl.BlockSpec((None, None, None, n_chunks, dk, dv), lambda b, h, r: (b, r, h, 0, 0, 0))
    vec = pl.BlockSpec((None, None, None, dk), lambda b, h, r: (b, r, h, 0))
    return shared, per_dir, state, states, vec


def _chunk_specs(length, dk, dv, n_chunks):
    """Blocks for the two-phase kernels' per-chunk grid (batch, head, direction x chunk): a
    head's (L, d) rows shared by the directions, one direction's rows, its chunk states."""
    whole = lambda d: pl.BlockSpec((None, length, None, d), lambda i, j, rc: (i, 0, j, 0))
    dir_rows = lambda d: pl.BlockSpec((None, length, None, None, d), lambda i, j, rc: (i, 0, rc // n_chunks, j, 0))
    dir_states = pl.BlockSpec((None, None, None, n_chunks, dk, dv),
                              lambda i, j, rc: (i, rc // n_chunks, j, 0, 0, 0))
    return whole, dir_rows, dir_states


def _padded(x, length):
    return x if x.shape[1] == length else jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def forward(q, k, v, g, *, scale, directions, save_states, interpret, config: Config | None = None):
    """q, k (b, L, h, dk), v (b, L, h, dv), g (b, L, R, h, dk) with R = len(directions).

    Returns o (b, L, R, h, dv) in q's dtype and the final state (b, R, h, dk, dv) float32;
    with ``save_states`` also the state entering every chunk, (b, R, h, cdiv(L, C), dk, dv)."""
    b, length, h, dk = q.shape
    dv = v.shape[-1]
    lp = max(length, CHUNK)  # below one chunk: zero rows at the end are identity steps
    q, k, v, g = (_padded(x, lp) for x in (q, k, v, g))
    n_chunks = pl.cdiv(lp, CHUNK)
    r = len(directions)
    shared, per_dir, state, states, _ = _specs(lp, dk, dv, n_chunks)
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, lp, r, h, dv), q.dtype), jax.ShapeDtypeStruct((b, r, h, dk, dv), f32)]
    out_specs = [per_dir(dv), state]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, r, h, n_chunks, dk, dv), f32))
        out_specs.append(states)
    cfg = config or config_for("fwd", dk, dv, length)
    if cfg.two_phase:
        o, last, saved = _two_phase_forward(q, k, v, g, lp=lp, scale=scale, directions=tuple(directions),
                                            n_chunks=n_chunks, cfg=cfg, interpret=interpret)
        return (o[:, :length], last) + ((saved,) if save_states else ())
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, length=lp, scale=scale, directions=tuple(directions),
                          save_states=save_states),
        grid=(b, h, r), in_specs=[shared(dk), shared(dk), shared(dv), per_dir(dk)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gla_fwd",
    )(q, k, v, g)
    return (outs[0][:, :length],) + tuple(outs[1:])


def _two_phase_forward(q, k, v, g, *, lp, scale, directions, n_chunks, cfg, interpret):
    """``forward`` as two launches: the chunks' entry states by one walk, then all chunks'
    outputs side by side (grid (batch, head, direction x chunk))."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    r = len(directions)
    shared, per_dir, state, states, _ = _specs(lp, dk, dv, n_chunks)
    f32 = jnp.float32
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    last, saved = pl.pallas_call(
        functools.partial(_states_kernel, length=lp, directions=directions),
        grid=(b, h, r), in_specs=[shared(dk), shared(dv), per_dir(dk)], out_specs=[state, states],
        out_shape=[jax.ShapeDtypeStruct((b, r, h, dk, dv), f32),
                   jax.ShapeDtypeStruct((b, r, h, n_chunks, dk, dv), f32)],
        interpret=interpret, compiler_params=params, name="gla_fwd_states",
    )(k, v, g)
    whole, dir_rows, dir_states = _chunk_specs(lp, dk, dv, n_chunks)
    o = pl.pallas_call(
        functools.partial(_outputs_kernel, length=lp, scale=scale, directions=directions, n_chunks=n_chunks),
        grid=(b, h, r * n_chunks), in_specs=[whole(dk), whole(dk), whole(dv), dir_rows(dk), dir_states],
        out_specs=dir_rows(dv), out_shape=jax.ShapeDtypeStruct((b, lp, r, h, dv), q.dtype),
        interpret=interpret, compiler_params=params, name="gla_fwd_outputs",
    )(q, k, v, g, saved)
    return o, last, saved


def backward(q, k, v, g, states, last, do, dlast, *, scale, directions, interpret,
             config: Config | None = None):
    """The gradients of ``forward``'s outputs o and final state: dq, dk, dv summed over the
    directions, dg per direction (b, L, R, h, dk), from the saved ``states`` and ``last``."""
    b, length, h, dk = q.shape
    dv = v.shape[-1]
    lp = max(length, CHUNK)
    q, k, v, g, do = (_padded(x, lp) for x in (q, k, v, g, do))
    r = len(directions)
    shared, per_dir, state, states_spec, vec = _specs(lp, dk, dv, states.shape[3])
    # The final state's own term of the gate gradient: scaling every gate after the start by
    # e^eps scales the final state by e^eps.
    dg0 = jnp.sum(last * dlast.astype(jnp.float32), axis=-1)
    f32 = jnp.float32
    cfg = config or config_for("bwd", dk, dv, length)
    cut = lambda x, like: x[:, :length].sum(2).astype(like.dtype)  # summed over the directions
    if cfg.two_phase:
        dq, dk_, dv_, dg = _two_phase_backward(q, k, v, g, states, do, dlast, dg0, lp=lp, scale=scale,
                                               directions=tuple(directions), cfg=cfg, interpret=interpret)
        return cut(dq, q), cut(dk_, k), cut(dv_, v), dg[:, :length].astype(g.dtype)
    dq, dk_, dv_, dg = pl.pallas_call(
        functools.partial(_bwd_kernel, length=lp, scale=scale, directions=tuple(directions)),
        grid=(b, h, r),
        in_specs=[shared(dk), shared(dk), shared(dv), per_dir(dk), states_spec, per_dir(dv), state, vec],
        out_specs=[per_dir(dk), per_dir(dk), per_dir(dv), per_dir(dk)],
        out_shape=[jax.ShapeDtypeStruct((b, lp, r, h, dk), f32), jax.ShapeDtypeStruct((b, lp, r, h, dk), f32),
                   jax.ShapeDtypeStruct((b, lp, r, h, dv), f32), jax.ShapeDtypeStruct((b, lp, r, h, dk), f32)],
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gla_bwd",
    )(q, k, v, g, states, do, dlast, dg0)
    return cut(dq, q), cut(dk_, k), cut(dv_, v), dg[:, :length].astype(g.dtype)


def _two_phase_backward(q, k, v, g, states, do, dlast, dg0, *, lp, scale, directions, cfg, interpret):
    """``backward`` as two launches: the adjoint of the state leaving every chunk by one walk
    back, then every chunk's gradients side by side; dg's sums over the later chunks are
    added here from each chunk's sum (a reverse cumulative sum over chunks)."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    r = len(directions)
    n_chunks = states.shape[3]
    shared, per_dir, state, states_spec, _ = _specs(lp, dk, dv, n_chunks)
    f32 = jnp.float32
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dstates = pl.pallas_call(
        functools.partial(_bwd_states_kernel, length=lp, scale=scale, directions=directions),
        grid=(b, h, r), in_specs=[shared(dk), per_dir(dk), per_dir(dv), state], out_specs=states_spec,
        out_shape=jax.ShapeDtypeStruct((b, r, h, n_chunks, dk, dv), f32),
        interpret=interpret, compiler_params=params, name="gla_bwd_states",
    )(q, g, do, dlast)
    whole, dir_rows, dir_states = _chunk_specs(lp, dk, dv, n_chunks)
    sums = pl.BlockSpec((None, None, None, None, dk), lambda i, j, rc: (i, rc // n_chunks, j, rc % n_chunks, 0))
    rows = lambda d: jax.ShapeDtypeStruct((b, lp, r, h, d), f32)
    dq, dk_, dv_, dg, chunk_sums = pl.pallas_call(
        functools.partial(_bwd_chunks_kernel, length=lp, scale=scale, directions=directions, n_chunks=n_chunks),
        grid=(b, h, r * n_chunks),
        in_specs=[whole(dk), whole(dk), whole(dv), dir_rows(dk), dir_states, dir_states, dir_rows(dv)],
        out_specs=[dir_rows(dk), dir_rows(dk), dir_rows(dv), dir_rows(dk), sums],
        out_shape=[rows(dk), rows(dk), rows(dv), rows(dk), jax.ShapeDtypeStruct((b, r, h, n_chunks, dk), f32)],
        interpret=interpret, compiler_params=params, name="gla_bwd_chunks",
    )(q, k, v, g, states, dstates, do)
    # dg at a row also sums q dq - k dk over every later chunk in scan order, and the final
    # state's term dg0: per chunk, a reverse cumulative sum over chunks (exclusive).
    suffix = jnp.cumsum(chunk_sums[:, :, :, ::-1], axis=3)[:, :, :, ::-1]  # chunk c and after
    later = jnp.pad(suffix[:, :, :, 1:], ((0, 0), (0, 0), (0, 0), (0, 1), (0, 0))) + dg0[:, :, :, None, :]
    pos = jnp.arange(lp)
    chunk_of_row = jnp.stack([(lp - 1 - pos if d else pos) // CHUNK for d in directions])  # (r, lp)
    per_row = jnp.take_along_axis(later, chunk_of_row[None, :, None, :, None], axis=3)  # (b, r, h, lp, dk)
    return dq, dk_, dv_, dg + per_row.transpose(0, 3, 1, 2, 4)
