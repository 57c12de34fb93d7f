"""Pallas (Mosaic TPU) gated-linear-attention kernels: chunked forward and backward.

Imported as ``vim_jax.kernels.gla_tpu``; ``vim_jax.mixers.gla`` chooses them where a program
is lowered for TPU. Semantics are ``vim_jax.mixers.gla``'s; the chunked equations, the
same as the Triton kernels' (``vim_jax.kernels.gla``), are in docs/mixers.md.

Layout: lane-dense rows. ViG's heads are small (dk 32, dv 64): a (chunk, dk) tile of one
head would fill a quarter of a vector register's 128 lanes, and a (heads, dk) minor pair is
padded to (8, 128) in HBM. So every head of a token sits side by side on the lanes, as the
model's projections lay them out: q, k, g rows of K = heads * dk channels and v, o rows of
V = heads * dv. Within a chunk of ``CHUNK`` rows a head never sees another head's channels
through masks, not slices (Mosaic slices lanes only at multiples of 128):

- the state is held block-diagonal, (K, V) float32 in VMEM, head h's (dk, dv) block at rows
  h*dk and lanes h*dv, zeros elsewhere; ``head_mask`` (K, V) keeps it so;
- a chunk's per-head scores, sum over a head's dk channels of q_i * decay_ij * k_j, are
  one (C*C, K) x (K, V) product with ``head_mask``: each output lane gets its own head's
  score, ready to weight v's lanes.

Every exponent is <= 0, as in the other forms: the decay between rows i and j of a chunk is
exp(b_i - b_j) over (C, C, K), masked before the exp. In-chunk cumulative sums are products
with a triangular matrix of ones (Mosaic has no cumsum), and every product runs at HIGHEST
precision (float32 on the MXU).

Grid: (batch, direction, head group, sequence block), the last "arbitrary": the state stays
in VMEM scratch from one block to the next. A program takes all heads, or, where a group of
them fills whole 128-lane blocks (ViG-B: 4 of its 12 heads, 128 q and 256 v lanes), one
group: the block-diagonal state is then 4 blocks wide, not 12 (``group``). Both directions of ``bigla`` run in one launch on the
same q, k, v; a reverse direction reads its blocks through a reversed index map and its
chunks last to first: no flipped copies. The sequence is zero-padded to whole blocks: a zero
key, value and gate is an identity step in either direction.

The differentiated forward writes the state entering every chunk, stored lane-dense as
(dk, V) (row r of every head's block side by side; the block-diagonal zeros are not
stored), (batch, directions, chunks, dk, V) float32. The backward walks the chunks in
reverse scan order from them, carrying the state's adjoint and the running sum that gives
the gates' gradient: dg = (reverse) cumulative sum of q * dq - k * dk, plus the final
state's own term (added by the caller).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

CHUNK = 16  # rows of a chunk: two float32 sublane tiles
SEQ_BLOCK = 256  # positions a program at most
_HI = jax.lax.Precision.HIGHEST
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=_NN):
    return jax.lax.dot_general(a, b, dims, precision=_HI, preferred_element_type=jnp.float32)


def seq_block(length: int) -> int:
    """Positions a program walks: ``SEQ_BLOCK``, or the whole sequence rounded up to chunks."""
    return min(SEQ_BLOCK, pl.cdiv(length, CHUNK) * CHUNK)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _reversed(directions, r):
    """Whether direction ``r`` (a traced grid index) walks from the last position."""
    rev = jnp.bool_(False)
    for i, d in enumerate(directions):
        if d:
            rev = rev | (r == i)
    return rev


class _Heads:
    """The 0/1 matrices that keep heads apart on lane-dense rows (built in the kernel from
    iotas): ``mask`` (K, V), 1 where row and lane belong to one head; ``spread`` (dk, K),
    1 where a row of the lane-dense (dk, V) state is row r of some head's block."""

    def __init__(self, heads, dk, dv):
        k, v = heads * dk, heads * dv
        # lax.div and lax.rem: iotas are >= 0, and Mosaic lowers jnp's floor division
        # through sign, which needs a TPU to ask its generation.
        self.mask = (jax.lax.div(_iota((k, v), 0), dk) == jax.lax.div(_iota((k, v), 1), dv)).astype(jnp.float32)
        self.spread = (jax.lax.rem(_iota((dk, k), 1), dk) == _iota((dk, k), 0)).astype(jnp.float32)

    def dense(self, state):
        """(K, V) block-diagonal -> (dk, V): each head's block, its lanes kept."""
        return _dot(self.spread, state)

    def block(self, dense):
        """(dk, V) -> (K, V) block-diagonal."""
        return self.mask * _dot(self.spread, dense, _TN)


def _chunk_decays(g, rev):
    """The chunk's in-chunk cumulative gates b (C, K) in walk order, its total (1, K), the
    walk-order mask ``tri`` (C, C) (row i sees row j) and the decays (C, C, K)
    exp(b_i - b_j) where row i sees row j, else 0."""
    c, kk = g.shape
    i, j = _iota((c, c), 0), _iota((c, c), 1)
    # Selects on int32 steps, not on masks (Mosaic selects no boolean vectors).
    tri = (jnp.where(rev, j - i, i - j) >= 0).astype(jnp.float32)
    cum = _dot(tri, g)
    total = jnp.sum(g, axis=0, keepdims=True)
    i3, j3 = _iota((c, c, kk), 0), _iota((c, c, kk), 1)
    sees = jnp.where(rev, j3 - i3, i3 - j3) >= 0
    decay = jnp.exp(jnp.where(sees, cum[:, None, :] - cum[None, :, :], -jnp.inf))
    return cum, total, tri, decay


def _head_scores(heads, x):
    """(C, C, K) -> (C, C, V): each lane gets its head's sum over its dk channels."""
    c, _, kk = x.shape
    return _dot(x.reshape(c * c, kk), heads.mask).reshape(c, c, -1)


def _column(row):
    """(1, K) -> (K, 1)."""
    return row.reshape(-1, 1)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, *refs, scale, directions, heads, dk, dv, save_states):
    if save_states:
        o_ref, last_ref, states_ref, s_ref = refs
    else:
        (o_ref, last_ref, s_ref), states_ref = refs, None
    ls = o_ref.shape[0]
    per = ls // CHUNK
    s, ns = pl.program_id(3), pl.num_programs(3)
    rev = _reversed(directions, pl.program_id(1))
    hd = _Heads(heads, dk, dv)

    @pl.when(s == 0)
    def _():
        s_ref[...] = jnp.zeros_like(s_ref)

    def chunk_walk(j, state):
        c = jnp.where(rev, per - 1 - j, j)
        rows = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        if save_states:
            states_ref[c] = hd.dense(state)
        q, k, v, g = (ref[rows, :].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref, g_ref))
        cum, total, _, decay = _chunk_decays(g, rev)
        scores = _head_scores(hd, q[:, None, :] * decay * k[None, :, :])  # (C, C, V)
        intra = jnp.sum(scores * v[None, :, :], axis=1)
        inter = _dot(q * jnp.exp(cum), state)
        o_ref[rows, :] = (scale * (inter + intra)).astype(o_ref.dtype)
        carried = k * jnp.exp(total - cum)
        return _column(jnp.exp(total)) * state + hd.mask * _dot(carried, v, _TN)

    state = jax.lax.fori_loop(0, per, chunk_walk, s_ref[...])
    s_ref[...] = state

    @pl.when(s == ns - 1)
    def _():
        last_ref[...] = hd.dense(state)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, do_ref, dlast_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                ds_ref, carry_ref, *, scale, directions, heads, dk, dv):
    ls = do_ref.shape[0]
    per = ls // CHUNK
    s = pl.program_id(3)
    rev = _reversed(directions, pl.program_id(1))
    hd = _Heads(heads, dk, dv)

    @pl.when(s == 0)
    def _():
        ds_ref[...] = hd.block(dlast_ref[...])
        carry_ref[...] = jnp.zeros_like(carry_ref)

    def chunk_walk(j, carried):
        ds, acc = carried  # the adjoint of the state leaving the chunk; later chunks' dg
        c = jnp.where(rev, j, per - 1 - j)  # reverse scan order
        rows = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        q, k, v, g = (ref[rows, :].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref, g_ref))
        do = scale * do_ref[rows, :].astype(jnp.float32)
        state = hd.block(states_ref[c])
        cum, total, tri, decay = _chunk_decays(g, rev)
        q_decay, k_decay = jnp.exp(cum), jnp.exp(total - cum)
        scores = _head_scores(hd, q[:, None, :] * decay * k[None, :, :])  # (C, C, V)
        c2 = do.shape[0] * do.shape[0]
        dscores = _dot((do[:, None, :] * v[None, :, :]).reshape(c2, -1), hd.mask, _NT).reshape(decay.shape)
        weighted = dscores * decay  # (C, C, K); decay is 0 where row i does not see row j
        dq = q_decay * _dot(do, state, _NT) + jnp.sum(weighted * k[None, :, :], axis=1)
        dk_ = k_decay * _dot(v, ds, _NT) + jnp.sum(weighted * q[:, None, :], axis=0)
        dv_ = jnp.sum(scores * do[:, None, :], axis=0) + _dot(k * k_decay, ds)
        term = q * dq - k * dk_
        dg = _dot(tri, term, _TN) + acc  # the sum over rows at or after each row, in walk order
        for ref, x in ((dq_ref, dq), (dk_ref, dk_), (dv_ref, dv_), (dg_ref, dg)):
            ref[rows, :] = x.astype(ref.dtype)
        ds = _column(jnp.exp(total)) * ds + hd.mask * _dot(q * q_decay, do, _TN)
        return ds, acc + jnp.sum(term, axis=0, keepdims=True)

    ds, acc = jax.lax.fori_loop(0, per, chunk_walk, (ds_ref[...], carry_ref[...]))
    ds_ref[...], carry_ref[...] = ds, acc


def _layout(q, v, g):
    b, length, heads, dk = q.shape
    dv, r = v.shape[-1], g.shape[2]
    ls = seq_block(length)
    lp = pl.cdiv(length, ls) * ls
    return b, length, heads, dk, dv, r, ls, lp, lp // ls


def _rows(x, lp):
    """(b, L, h, d) -> (b, Lp, h * d) and (b, L, R, h, d) -> (b, R, Lp, h * d), zero-padded
    to Lp positions (a block's last two axes must be (rows, lanes))."""
    x = x.reshape(*x.shape[:-2], -1)
    if x.ndim == 4:
        x = x.transpose(0, 2, 1, 3)
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, lp - x.shape[-2]), (0, 0)])


def group(heads: int, dk: int, dv: int) -> int:
    """Heads a program takes: the fewest whose q and v channels are whole multiples of 128
    lanes (ViG-B's 12 heads of 32/64: 4, so a block-diagonal state of 128 x 256, not 384 x
    768), else all of them (ViG-T's 3, ViG-S's 6: a block's lanes are then the array's)."""
    return next((g for g in range(1, heads) if heads % g == 0 and g * dk % 128 == 0 and g * dv % 128 == 0),
                heads)


def _specs(directions, ls, ns, vg, dk):
    """Block specs on the (batch, direction, head group, grid step) grid: ``shared(width)``
    and ``per_dir(width)`` rows of a sequence block, the chunk states and the final state
    of a program's ``vg`` v lanes."""
    def walk(backward):
        def index(r, s):
            rev = _reversed(directions, r)
            return jnp.where(rev != backward, ns - 1 - s, s)
        return index

    def specs(backward):
        w = walk(backward)
        shared = lambda width: pl.BlockSpec((None, ls, width), lambda b, r, h, s: (b, w(r, s), h))
        per_dir = lambda width: pl.BlockSpec((None, None, ls, width), lambda b, r, h, s: (b, r, w(r, s), h))
        states = pl.BlockSpec((None, None, ls // CHUNK, dk, vg), lambda b, r, h, s: (b, r, w(r, s), 0, h))
        return shared, per_dir, states

    state = pl.BlockSpec((None, None, dk, vg), lambda b, r, h, s: (b, r, 0, h))
    return specs, state


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(q, k, v, g, *, scale, directions, save_states, interpret=False):
    """q, k (b, L, h, dk), v (b, L, h, dv), g (b, L, R, h, dk) the R directions' gates ->
    (o (b, L, R, h, dv) in q's dtype, final states (b, R, h, dk, dv) float32, and with
    ``save_states`` the state entering every chunk, (b, R, chunks, dk, h * dv) float32 with
    chunks those of the zero-padded sequence), as the Triton kernels' ``forward``. ``interpret``: False, or ``pltpu.InterpretParams``."""
    b, length, heads, dk, dv, r, ls, lp, ns = _layout(q, v, g)
    vv, gh = heads * dv, group(heads, dk, dv)
    kg, vg = gh * dk, gh * dv
    specs, state = _specs(directions, ls, ns, vg, dk)
    shared, per_dir, states = specs(backward=False)
    out_specs = [per_dir(vg), state]
    out_shape = [jax.ShapeDtypeStruct((b, r, lp, vv), q.dtype), jax.ShapeDtypeStruct((b, r, dk, vv), jnp.float32)]
    if save_states:
        out_specs.append(states)
        out_shape.append(jax.ShapeDtypeStruct((b, r, lp // CHUNK, dk, vv), jnp.float32))
    kernel = functools.partial(_fwd_kernel, scale=scale, directions=directions, heads=gh, dk=dk, dv=dv,
                               save_states=save_states)
    outs = pl.pallas_call(
        kernel, grid=(b, r, heads // gh, ns), in_specs=[shared(kg), shared(kg), shared(vg), per_dir(kg)],
        out_specs=out_specs, out_shape=out_shape, scratch_shapes=[pltpu.VMEM((kg, vg), jnp.float32)],
        compiler_params=_params(), interpret=interpret, name="gla_fwd_tpu",
    )(_rows(q, lp), _rows(k, lp), _rows(v, lp), _rows(g, lp))
    o = outs[0][:, :, :length].reshape(b, r, length, heads, dv).transpose(0, 2, 1, 3, 4)
    last = _heads_first(outs[1], heads)
    return (o, last) + ((outs[2],) if save_states else ())


def _heads_first(dense, heads):
    """(b, R, dk, h * dv) -> (b, R, h, dk, dv)."""
    b, r, dk, vv = dense.shape
    return dense.reshape(b, r, dk, heads, vv // heads).transpose(0, 1, 3, 2, 4)


def backward(q, k, v, g, states, last, do, dlast, *, scale, directions, interpret=False):
    """The gradients (dq, dk, dv, dg) of ``forward``'s (o, final state), in the inputs'
    shapes and dtypes (q, k (b, L, h, dk), v (b, L, h, dv), g (b, L, R, h, dk)), from its
    saved ``states`` (b, R, chunks, dk, h * dv) and ``last`` (b, R, h, dk, dv) and the
    cotangents ``do`` (b, L, R, h, dv) and ``dlast`` (b, R, h, dk, dv)."""
    b, length, heads, dk, dv, r, ls, lp, ns = _layout(q, v, g)
    kk, vv, gh = heads * dk, heads * dv, group(heads, dk, dv)
    kg, vg = gh * dk, gh * dv
    specs, state = _specs(directions, ls, ns, vg, dk)
    shared, per_dir, states_spec = specs(backward=True)
    dlast_dense = dlast.astype(jnp.float32).transpose(0, 1, 3, 2, 4).reshape(b, r, dk, vv)
    kernel = functools.partial(_bwd_kernel, scale=scale, directions=directions, heads=gh, dk=dk, dv=dv)
    f32 = lambda width: jax.ShapeDtypeStruct((b, r, lp, width), jnp.float32)
    dq, dk_, dv_, dg = pl.pallas_call(
        kernel, grid=(b, r, heads // gh, ns),
        in_specs=[shared(kg), shared(kg), shared(vg), per_dir(kg), states_spec, per_dir(vg), state],
        out_specs=[per_dir(kg), per_dir(kg), per_dir(vg), per_dir(kg)],
        out_shape=[f32(kk), f32(kk), f32(vv), f32(kk)],
        scratch_shapes=[pltpu.VMEM((kg, vg), jnp.float32), pltpu.VMEM((1, kg), jnp.float32)],
        compiler_params=_params(), interpret=interpret, name="gla_bwd_tpu",
    )(_rows(q, lp), _rows(k, lp), _rows(v, lp), _rows(g, lp), states, _rows(do, lp), dlast_dense)
    # q, k, v are shared by the directions: their gradients add up.
    shape = lambda x, d: x[:, :, :length].reshape(b, r, length, heads, d)
    dq, dk_, dv_ = (shape(x, d).sum(1) for x, d in ((dq, dk), (dk_, dk), (dv_, dv)))
    # The final state's own term: scaling every gate by e^eps scales it by e^eps.
    dg0 = jnp.sum(last * dlast.astype(jnp.float32), axis=-1)  # (b, R, h, dk)
    dg = (shape(dg, dk) + dg0[:, :, None]).transpose(0, 2, 1, 3, 4)
    return tuple(d.astype(x.dtype) for d, x in zip((dq, dk_, dv_, dg), (q, k, v, g)))
