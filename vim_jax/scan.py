"""Selective scan (Mamba's S6 recurrence): one entry point, several backends.

Layout is channels-last throughout (the official CUDA op is channels-first):

    u, delta, z : (batch, length, d_inner)
    B, C        : (batch, length, d_state)
    A           : (d_inner, d_state)
    D, delta_bias : (d_inner,)

Semantics (official ``selective_scan_ref``), per batch b and channel d:

    dt_t  = softplus(delta_t + delta_bias)     (or delta_t + delta_bias)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t
    y_t   = <h_t, C_t> + D * u_t
    out_t = y_t * silu(z_t)

``reverse=True`` runs t from length-1 down to 0 on the same arrays, which is how
the bidirectional Vim mixer avoids flipped copies.

The "reference" backend is portable JAX (``lax.scan``) with a float32 state and a
custom VJP whose backward recomputes the states chunk by chunk from chunk-boundary
checkpoints: the forward stores O(B*D*N*L/chunk) state, never the O(B*L*D*N) of
all states. Equations: ../shared/design/selective_scan.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vim_jax import fastmath

BACKENDS = ("auto", "reference", "pallas")

# Reference backend tuning, measured on a 2-core CPU at Vim-Ti shapes: the forward saves
# the state every DEFAULT_CHUNK steps (the backward recomputes one chunk at a time; 4 or
# 16 were slower); the forward loops are unrolled _UNROLL_FWD times, the backward's are
# not (XLA then fuses the recurrence into each step's kernel and recomputes it: 5-20x
# slower).
DEFAULT_CHUNK = 8
_UNROLL_FWD = 8


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array] = None,
    z: Optional[jax.Array] = None,
    delta_bias: Optional[jax.Array] = None,
    *,
    delta_softplus: bool = False,
    reverse: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
):
    """Runs the selective scan.

    Args:
      u, delta: (batch, length, d_inner).
      A: (d_inner, d_state), real (negative for a stable scan).
      B, C: (batch, length, d_state).
      D: optional (d_inner,) skip connection.
      z: optional (batch, length, d_inner) gate; the output is multiplied by silu(z).
      delta_bias: optional (d_inner,) added to delta before the softplus.
      delta_softplus: apply softplus to delta + delta_bias.
      reverse: scan from the last position to the first.
      return_last_state: also return the final state, (batch, d_inner, d_state) float32.
      backend: "reference", "pallas" or "auto" (the best for the default device).

    Returns:
      out: (batch, length, d_inner) in u's dtype; and the last state if asked for.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    backend = resolve_backend(backend)
    if backend == "pallas":
        from kernels import selective_scan as pallas_scan  # GPU-only import path

        fn = pallas_scan.selective_scan
    else:
        fn = _reference_scan
    out, last = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    return (out, last) if return_last_state else out


def resolve_backend(backend: str) -> str:
    """Maps "auto" to the best backend for the default platform; validates names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"
    return backend


def _pallas_available() -> bool:
    try:
        import kernels.selective_scan  # noqa: F401
    except ImportError:
        return False
    return True


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, length, d_inner), got shape {u.shape}")
    b, l, d = u.shape
    n = A.shape[-1] if A.ndim == 2 else None
    expected = {
        "delta": (delta, (b, l, d)),
        "A": (A, (d, n)),
        "B": (B, (b, l, n)),
        "C": (C, (b, l, n)),
        "D": (D, (d,)),
        "z": (z, (b, l, d)),
        "delta_bias": (delta_bias, (d,)),
    }
    for name, (arr, shape) in expected.items():
        if arr is not None and tuple(arr.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(arr.shape)}; with u of shape {u.shape} "
                f"(batch, length, d_inner) and A of shape {A.shape} it must be {shape}"
            )


# ----------------------------------------------------------------------------
# Reference backend.


def _reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return _scan_vjp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, DEFAULT_CHUNK)


def _dt(delta, delta_bias, softplus):
    x = delta.astype(jnp.float32)
    if delta_bias is not None:
        x = x + delta_bias.astype(jnp.float32)
    return fastmath.softplus(x) if softplus else x


def _chunked(x, chunk):
    """(batch, L, k) -> (L/chunk, chunk, batch, k) float32, zero-padded at the end.

    Zero dt and zero input make a padded step the identity on the state in either
    direction, so padding never changes the result.
    """
    b, l, k = x.shape
    lp = -(-l // chunk) * chunk
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, lp - l), (0, 0)))
    return x.reshape(b, lp // chunk, chunk, k).transpose(1, 2, 0, 3)


def _unchunked(x, length):
    """(L/chunk, chunk, batch, k) -> (batch, length, k)."""
    nc, t, b, k = x.shape
    return x.reshape(nc * t, b, k)[:length].transpose(1, 0, 2)


def _drive(dtu_t, b_t):
    """A step's input to the states, dt u B: (batch, D) x (batch, N) -> (batch, N, D)."""
    return dtu_t[:, None, :] * b_t[:, :, None]


def _advance(h, dt_t, dtu_t, b_t, at):
    """One scan step on states (batch, N, D): h = exp(dt A) h + dt u B."""
    return fastmath.exp(dt_t[:, None, :] * at) * h + _drive(dtu_t, b_t)


def _readout(h, c_t):
    """<h, C_t> over the state axis, (batch, N, D) -> (batch, D). A multiply and a sum
    rather than an einsum: XLA turns the einsum into a small dot per step, slow on the CPU."""
    return jnp.sum(h * c_t[:, :, None], axis=1)


def _forward(dt, u, A, B, C, reverse, chunk):
    """Scans states (batch, N, D) float32 (D on the vector lanes).

    Returns y = <h_t, C_t> as (batch, L, D), the chunk-entry states
    (L/chunk, batch, N, D) and the last state (batch, N, D).
    """
    b, l, d = u.shape
    n = A.shape[1]
    at = A.astype(jnp.float32).T  # (N, D)
    xs = (_chunked(dt, chunk), _chunked(dt * u.astype(jnp.float32), chunk),
          _chunked(B, chunk), _chunked(C, chunk))

    def step(h, x):
        dt_t, dtu_t, b_t, c_t = x
        h = _advance(h, dt_t, dtu_t, b_t, at)
        return h, _readout(h, c_t)

    def chunk_step(h, x):
        h_out, y = jax.lax.scan(step, h, x, reverse=reverse, unroll=_UNROLL_FWD)
        return h_out, (h, y)

    h0 = jnp.zeros((b, n, d), jnp.float32)
    last, (entries, y) = jax.lax.scan(chunk_step, h0, xs, reverse=reverse)
    return _unchunked(y, l), entries, last


# Rows of state a loop step should update. Measured on a 2-core CPU at d_inner 384: a
# batch of 1 scans about 2x faster as 2 (or more) segments; from batch 2 on, the single
# pass is faster (1.7x less arithmetic).
_ROWS_PER_STEP = 2
_MIN_SEGMENT = 32


def num_segments(batch: int, length: int) -> int:
    """How many independent segments the inference scan splits the sequence into."""
    return max(1, min(-(-_ROWS_PER_STEP // batch), length // _MIN_SEGMENT))


def _forward_segmented(dt, u, A, B, C, reverse, segments):
    """Inference scan in K segments side by side: L/K loop steps instead of L.

    Pass 1 scans every segment from a zero state to its local end state; the true entry
    state of each segment follows from a K-step recurrence with the segment's total decay
    exp(A * sum dt); pass 2 rescans all segments from their true entry states and emits y.
    About 1.7x the arithmetic of one pass, for K times fewer (sequential) loop steps: a
    win when the batch is too small to keep the CPU busy (batch 1, long sequences).
    Returns y (batch, L, D) float32 and the last state (batch, N, D).
    """
    b, l, d = u.shape
    n, k = A.shape[1], segments
    seg = -(-l // k)
    at = A.astype(jnp.float32).T

    def split(x):  # (b, l, c) -> (seg, b*k, c), zero (identity) steps padded at the end
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, k * seg - l), (0, 0)))
        return x.reshape(b, k, seg, -1).transpose(2, 0, 1, 3).reshape(seg, b * k, -1)

    dt_s, dtu_s, b_s, c_s = split(dt), split(dt * u.astype(jnp.float32)), split(B), split(C)

    zeros = jnp.zeros((b * k, n, d), jnp.float32)
    local_end, _ = jax.lax.scan(lambda h, x: (_advance(h, *x, at), None), zeros, (dt_s, dtu_s, b_s),
                                reverse=reverse, unroll=_UNROLL_FWD)
    decay = fastmath.exp(jnp.sum(dt_s, axis=0)[:, None, :] * at)  # (b*k, n, d): whole-segment decay
    to_k = lambda x: x.reshape(b, k, n, d).transpose(1, 0, 2, 3)
    last, entry = jax.lax.scan(lambda h, x: (x[0] * h + x[1], h), jnp.zeros((b, n, d), jnp.float32),
                               (to_k(decay), to_k(local_end)), reverse=reverse)

    def emit(h, x):
        h = _advance(h, *x[:3], at)
        return h, _readout(h, x[3])

    _, y = jax.lax.scan(emit, entry.transpose(1, 0, 2, 3).reshape(b * k, n, d),
                        (dt_s, dtu_s, b_s, c_s), reverse=reverse, unroll=_UNROLL_FWD)
    y = y.reshape(seg, b, k, d).transpose(1, 2, 0, 3).reshape(b, k * seg, d)[:, :l]
    return y, last


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _scan_vjp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk):
    # Not differentiated: no chunk states to save, and small batches scan in segments.
    segments = num_segments(u.shape[0], u.shape[1])
    (out, last), _ = _scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                    chunk, segments)
    return out, last


def _scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk, segments=0):
    dt = _dt(delta, delta_bias, delta_softplus)
    if segments > 1:
        y, last = _forward_segmented(dt, u, A, B, C, reverse, segments)
        entries = None
    else:
        y, entries, last = _forward(dt, u, A, B, C, reverse, chunk)
    if D is not None:
        y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
    out = y if z is None else y * fastmath.silu(z.astype(jnp.float32))
    return (out.astype(u.dtype), last.transpose(0, 2, 1)), (y, entries)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk):
    outs, (y, entries) = _scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk)
    # Named so that a remat policy can keep them (the models' default does): the backward
    # pass then does not rerun the forward scan to rebuild them.
    return outs, (u, delta, A, B, C, D, z, delta_bias, checkpoint_name(y, "scan_y"),
                  checkpoint_name(entries, "scan_states"))


def _scan_bwd(delta_softplus, reverse, chunk, res, cts):
    u, delta, A, B, C, D, z, delta_bias, y, entries = res
    g_out, g_last = cts
    b, l, d = u.shape
    f32 = jnp.float32
    g = g_out.astype(f32)
    uf = u.astype(f32)
    if z is None:
        gy, gz = g, None
    else:
        zf = z.astype(f32)
        sig = jax.nn.sigmoid(zf)
        gy = g * zf * sig
        gz = (g * y * sig * (1 + zf * (1 - sig))).astype(z.dtype)
    gD = None if D is None else jnp.sum(gy * uf, axis=(0, 1)).astype(D.dtype)

    dt = _dt(delta, delta_bias, delta_softplus)
    at = A.astype(f32).T  # (N, D)
    dtu = dt * uf
    xs = (_chunked(dt, chunk), _chunked(dtu, chunk), _chunked(B, chunk),
          _chunked(C, chunk), _chunked(gy, chunk), entries)
    hi = jax.lax.Precision.HIGHEST

    def chunk_grads(carry, x):
        dt_c, dtu_c, b_c, c_c, gy_c, h_entry = x  # (T, batch, .) and (batch, N, D)
        a_c = fastmath.exp(dt_c[:, :, None, :] * at)  # (T, batch, N, D)

        def recompute(h, x):
            a_t, dtu_t, b_t = x
            h = a_t * h + _drive(dtu_t, b_t)
            return h, h

        _, hs = jax.lax.scan(recompute, h_entry, (a_c, dtu_c, b_c), reverse=reverse)

        def adjoint(carry, x):
            lam_next, acc_a = carry  # lam_next = a_{t+1} * lam_{t+1}
            a_t, gy_t, c_t, h_t, dtu_t, b_t, dt_t = x
            lam = gy_t[:, None, :] * c_t[:, :, None] + lam_next
            # lam * a * h_prev, with a * h_prev = h - dt u B: no shifted copy of the states.
            w = lam * (h_t - _drive(dtu_t, b_t))
            # sum_n w * A as N slices added in the step's own kernel: no (T, batch, N, D)
            # array of w, and no separate reduce kernel (slow on the CPU).
            g_dt = sum(w[:, i, :] * at[i] for i in range(at.shape[0]))
            return (a_t * lam, acc_a + w * dt_t[:, None, :]), (lam, g_dt)

        carry, (lams, g_dt) = jax.lax.scan(adjoint, carry, (a_c, gy_c, c_c, hs, dtu_c, b_c, dt_c),
                                           reverse=not reverse)
        # The reductions over the chunk as batched matrix-vector products: XLA's CPU
        # reduce kernels are several times slower than its dot kernels.
        g_c = jnp.einsum("tbnd,tbd->tbn", hs, gy_c, precision=hi)
        g_b = jnp.einsum("tbnd,tbd->tbn", lams, dtu_c, precision=hi)
        lam_b = jnp.einsum("tbnd,tbn->tbd", lams, b_c, precision=hi)
        return carry, (lam_b, g_dt, g_b, g_c)

    lam0 = g_last.astype(f32).transpose(0, 2, 1)
    (_, acc_a), (lam_b, g_dt, g_b, g_c) = jax.lax.scan(
        chunk_grads, (lam0, jnp.zeros(lam0.shape, f32)), xs, reverse=not reverse)
    gAt = jnp.sum(acc_a, axis=0)
    lam_b, g_dt = _unchunked(lam_b, l), _unchunked(g_dt, l)
    g_b, g_c = _unchunked(g_b, l), _unchunked(g_c, l)
    g_u = dt * lam_b
    g_dt = g_dt + uf * lam_b

    if D is not None:
        g_u = g_u + gy * D.astype(f32)
    if delta_softplus:
        pre = delta.astype(f32) + (0 if delta_bias is None else delta_bias.astype(f32))
        g_dt = g_dt * jax.nn.sigmoid(pre)
    g_bias = None if delta_bias is None else jnp.sum(g_dt, axis=(0, 1)).astype(delta_bias.dtype)
    return (g_u.astype(u.dtype), g_dt.astype(delta.dtype), gAt.T.astype(A.dtype),
            g_b.astype(B.dtype), g_c.astype(C.dtype), gD, gz, g_bias)


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)
