"""Pallas (Triton) selective-scan kernels: fused forward and backward with recomputation.

Same layout and semantics as ``vim_jax.scan`` (channels-last; see that module and
../shared/design/selective_scan.md). One program per (batch element, block of BD
channels) keeps its (BD, d_state) state in registers and loops over the sequence:
u, delta, z, B, C are read once, the output written once, and the (B, L, D, N)
states never exist in HBM. The forward also writes the state at the start of every
chunk of T steps (O(B*D*N*L/T)); the backward walks the chunks from the end,
recomputes each chunk's states from its boundary state into a small per-program
scratch, and walks it backwards. dB and dC are reduced over d_inner outside the
kernel from per-block partials; dA, dD and d(delta_bias) from per-batch partials: no
atomics, deterministic results.

``reverse=True`` indexes position L-1-t at step t: no flipped copies. Channel blocks
that overhang d_inner are masked by Pallas inside the kernel. d_state must be a power
of two (Triton tiles); all arithmetic is float32 whatever the input dtype.

On a non-GPU platform the kernels run in Pallas interpret mode (for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# None: interpret unless the default backend is a GPU. Tests that lower for CUDA on a
# CPU-only machine set it to False.
INTERPRET: bool | None = None


def _interpret() -> bool:
    return jax.default_backend() != "gpu" if INTERPRET is None else INTERPRET


def block_sizes(d_inner: int, length: int) -> tuple[int, int]:
    """(channel block BD, chunk length T): powers of two, as Triton requires.

    BD trades parallelism (batch * d_inner / BD programs) against per-program work; 32
    keeps the (BD, 16) float32 state and its backward companions in registers. T bounds
    the backward's per-program scratch (T * BD * N floats) and the saved boundary states.
    """
    bd = min(32, pl.next_power_of_2(d_inner))
    t = min(64, 1 << (length.bit_length() - 1))  # a power of two <= length
    return bd, t


def _params(num_warps=4):
    return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _row(ref, t):
    """Row t of a (L, k) block as a float32 (1, k) tile."""
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _fwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref,
                out_ref, last_ref, states_ref, *, length, chunk, softplus, reverse, has_z):
    a = a_ref[...].astype(jnp.float32)                      # (BD, N)
    dskip = d_ref[...].astype(jnp.float32)[None, :]         # (1, BD)
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    n_chunks = pl.cdiv(length, chunk)

    def chunk_body(c, h):
        states_ref[pl.ds(c, 1), :, :] = h[None]

        def step(s, h):
            t = length - 1 - s if reverse else s
            u = _row(u_ref, t)                              # (1, BD)
            dt = _row(delta_ref, t) + bias
            dt = _softplus(dt) if softplus else dt
            b = _row(b_ref, t)                              # (1, N)
            h = jnp.exp(dt.reshape(-1, 1) * a) * h + (dt * u).reshape(-1, 1) * b
            y = jnp.sum(h * _row(c_ref, t), axis=1)[None, :] + dskip * u
            if has_z:
                z = _row(z_ref, t)
                y = y * z * _sigmoid(z)
            out_ref[pl.ds(t, 1), :] = y.astype(out_ref.dtype)
            return h

        return jax.lax.fori_loop(c * chunk, jnp.minimum((c + 1) * chunk, length), step, h)

    h0 = jnp.zeros(a.shape, jnp.float32)
    last_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0)


def _bwd_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, g_ref,
                glast_ref, states_ref,
                du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, hbuf_ref,
                *, length, chunk, softplus, reverse, has_z, d_inner, barrier):
    a = a_ref[...].astype(jnp.float32)
    bd = a.shape[0]
    # Channels of an overhanging last block hold undefined values: keep them out of the
    # sums over d (dB, dC). Per-channel outputs are masked on store by Pallas.
    channel = pl.program_id(1) * bd + jax.lax.broadcasted_iota(jnp.int32, (bd, 1), 0)
    valid = channel < d_inner
    dskip = d_ref[...].astype(jnp.float32)[None, :]
    bias = bias_ref[...].astype(jnp.float32)[None, :]
    n_chunks = pl.cdiv(length, chunk)
    pos = (lambda s: length - 1 - s) if reverse else (lambda s: s)

    def inputs(t):
        u = _row(u_ref, t)
        pre = _row(delta_ref, t) + bias
        dt = _softplus(pre) if softplus else pre
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
            dc_ref[pl.ds(t, 1), :] = jnp.sum(jnp.where(valid, gy.reshape(-1, 1) * h, 0.0), axis=0)[None, :]
            db_ref[pl.ds(t, 1), :] = jnp.sum(jnp.where(valid, lam * (dt * u).reshape(-1, 1), 0.0),
                                             axis=0)[None, :]
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


def _specs(bsz, length, d, n, bd, n_chunks):
    seq = pl.BlockSpec((None, length, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, length, n), lambda i, j: (i, 0, 0))
    a = pl.BlockSpec((bd, n), lambda i, j: (j, 0))
    vec = pl.BlockSpec((bd,), lambda i, j: (j,))
    state = pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0))
    states = pl.BlockSpec((None, n_chunks, bd, n), lambda i, j: (i, 0, j, 0))
    return seq, bc, a, vec, state, states


def _check(A):
    n = A.shape[1]
    if n & (n - 1):
        raise ValueError(f"the pallas selective scan needs d_state to be a power of two, got {n}; "
                         "use backend='reference'")


def _forward(u, delta, z, B, C, A, D, bias, softplus, reverse, has_z):
    bsz, length, d = u.shape
    n = A.shape[1]
    bd, chunk = block_sizes(d, length)
    n_chunks = pl.cdiv(length, chunk)
    seq, bc, a, vec, state, states = _specs(bsz, length, d, n, bd, n_chunks)
    kernel = functools.partial(_fwd_kernel, length=length, chunk=chunk, softplus=softplus,
                               reverse=reverse, has_z=has_z)
    return pl.pallas_call(
        kernel, grid=(bsz, pl.cdiv(d, bd)),
        in_specs=[seq, seq, seq, bc, bc, a, vec, vec],
        out_specs=[seq, state, states],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((bsz, d, n), jnp.float32),
                   jax.ShapeDtypeStruct((bsz, n_chunks, d, n), jnp.float32)],
        interpret=_interpret(), compiler_params=_params(), name="selective_scan_fwd",
    )(u, delta, z, B, C, A, D, bias)


def _backward(u, delta, z, B, C, A, D, bias, g, g_last, states, softplus, reverse, has_z):
    bsz, length, d = u.shape
    n = A.shape[1]
    bd, chunk = block_sizes(d, length)
    n_blocks = pl.cdiv(d, bd)
    n_chunks = states.shape[1]
    seq, bc, a, vec, state, states_spec = _specs(bsz, length, d, n, bd, n_chunks)
    part_bc = pl.BlockSpec((None, None, length, n), lambda i, j: (j, i, 0, 0))
    part_a = pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0))
    part_vec = pl.BlockSpec((None, bd), lambda i, j: (i, j))
    scratch = pl.BlockSpec((None, None, chunk, bd, n), lambda i, j: (i, j, 0, 0, 0))
    kernel = functools.partial(_bwd_kernel, length=length, chunk=chunk, softplus=softplus,
                               reverse=reverse, has_z=has_z, d_inner=d, barrier=not _interpret())
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
                   jax.ShapeDtypeStruct((bsz, d, n), f32),
                   jax.ShapeDtypeStruct((bsz, d), f32),
                   jax.ShapeDtypeStruct((bsz, d), f32),
                   jax.ShapeDtypeStruct((bsz, n_blocks, chunk, bd, n), f32)],
        interpret=_interpret(), compiler_params=_params(), name="selective_scan_bwd",
    )(u, delta, z, B, C, A, D, bias, g, g_last, states)
    du, ddelta, dz, db, dc, da, dd, dbias, _ = outs
    return du, ddelta, dz, db.sum(0), dc.sum(0), da.sum(0), dd.sum(0), dbias.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _scan(u, delta, z, B, C, A, D, bias, softplus, reverse, has_z):
    out, last, _ = _forward(u, delta, z, B, C, A, D, bias, softplus, reverse, has_z)
    return out, last


def _scan_fwd(u, delta, z, B, C, A, D, bias, softplus, reverse, has_z):
    out, last, states = _forward(u, delta, z, B, C, A, D, bias, softplus, reverse, has_z)
    return (out, last), (u, delta, z, B, C, A, D, bias, states)


def _scan_bwd(softplus, reverse, has_z, res, cts):
    u, delta, z, B, C, A, D, bias, states = res
    g, g_last = cts
    du, ddelta, dz, db, dc, da, dd, dbias = _backward(
        u, delta, z, B, C, A, D, bias, g, g_last, states, softplus, reverse, has_z)
    if not has_z:  # z is a stand-in that the kernel never reads: no gradient flows to it
        dz = jnp.zeros_like(z)
    return (du, ddelta, dz, db.astype(B.dtype), dc.astype(C.dtype), da.astype(A.dtype),
            dd.astype(D.dtype), dbias.astype(bias.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """Backend entry for ``vim_jax.scan.selective_scan``; returns (out, last_state (b, d, n))."""
    _check(A)
    d = u.shape[-1]
    has_z = z is not None
    # Absent optional inputs become zeros of size d (tiny); an absent z is never read.
    D_ = jnp.zeros((d,), jnp.float32) if D is None else D
    bias_ = jnp.zeros((d,), jnp.float32) if delta_bias is None else delta_bias
    out, last = _scan(u, delta, z if has_z else u, B, C, A, D_, bias_, delta_softplus, reverse, has_z)
    return out, last
