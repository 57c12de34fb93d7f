"""Selective scan (Mamba's S6 recurrence): one entry point, a kernel per platform.

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

Backends, chosen by the platform the program is lowered for (``jax.lax.platform_dependent``),
so one traced program carries the right kernel for each platform it is lowered for:

    backend      cpu                      cuda                 tpu                   other (rocm)
    "auto"       reference (CPU tuned)    Pallas Triton        Pallas Mosaic         reference
    "reference"  reference (CPU tuned)    reference            reference             reference
    "pallas"     Pallas, interpret mode   Pallas Triton        Pallas Mosaic         error at lowering
    "portable"   plain JAX, no per-platform choice (for converters such as jax2onnx)

On TPU the Mosaic kernels (``vim_jax.kernels.selective_scan_tpu``) run the forward and the
backward. "pallas" on the CPU runs the Triton kernels in interpret mode
(``tpu_interpret.run_tpu_kernels_on_cpu`` switches it to the TPU kernels in TPU interpret mode).

The "reference" backend is portable JAX (``lax.scan``) with a float32 state. It and the
Pallas backend share one custom VJP (the "portable" one has none: JAX differentiates it): the forward saves the state at the start of every
``STATE_CHUNK`` steps, (batch, length/STATE_CHUNK, d_inner, d_state) float32, named
"scan_states" for remat policies, and the backward recomputes the states chunk by chunk
from it: O(B*D*N*L/chunk) saved, never the O(B*L*D*N) of all states. Equations:
docs/mixers.md.

Under a mesh with a ``data`` axis (``jax.set_mesh``), each device scans its own share
of the batch (``jax.shard_map``): a Pallas kernel is opaque to XLA's partitioner.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vim_jax.kernels.activations import sigmoid, softplus_formula
from vim_jax.mixers import ops
from vim_jax.mixers import platform

BACKENDS = ("auto", "reference", "pallas", "portable")

# The saved state's stride: one platform-independent value, so the residual has the same
# shape whichever kernel a platform runs. 16 keeps the Pallas backward's chunk states in
# registers and its forward's extra HBM writes small (8 would double them in bfloat16);
# on the CPU the reference scan alone is 10% slower than with 8 (not seen in a whole step).
STATE_CHUNK = 16

# Reference backend tuning, measured on a 2-core CPU at Vim-Ti shapes: the inference scan
# loops over chunks of _INFERENCE_CHUNK steps (10% faster than 16); the forward loops are
# unrolled _UNROLL_FWD times, the backward's are not (XLA then fuses the recurrence into
# each step's kernel and recomputes it: 5-20x slower).
_INFERENCE_CHUNK = 8
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
      backend: "auto", "reference", "pallas" or "portable" (see the module docstring).

    Returns:
      out: (batch, length, d_inner) in u's dtype; and the last state if asked for.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    n = A.shape[1]
    if n & (n - 1):
        if backend == "pallas":
            raise ValueError(f"the pallas selective scan needs d_state to be a power of two, got {n}; "
                             "use backend='reference' or 'auto'")
        if backend == "auto":
            backend = "reference"  # the kernels need a power of two
    spec = _Spec(delta_softplus, reverse, z is not None, D is not None, delta_bias is not None, backend)
    if backend == "portable":
        out, last = _portable(spec, u, delta, z, B, C, A, D, delta_bias)
        return (out, last) if return_last_state else out
    d = u.shape[-1]
    # Absent optional inputs become zeros of size d (tiny); an absent z is never read.
    zeros = jnp.zeros((d,), jnp.float32)
    out, last = _scan(u, delta, u if z is None else z, B, C, A, zeros if D is None else D,
                      zeros if delta_bias is None else delta_bias, spec)
    return (out, last) if return_last_state else out


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


class _Spec(NamedTuple):
    """The static part of a scan call."""
    softplus: bool
    reverse: bool
    has_z: bool
    has_d: bool
    has_bias: bool
    backend: str


# ----------------------------------------------------------------------------
# One custom VJP over every backend. Arguments: (u, delta, z, B, C, A, D, bias); the
# backward also takes (states, g, g_last) and returns the eight gradients.


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _scan(u, delta, z, B, C, A, D, bias, spec):
    return _run(spec, "primal", u, delta, z, B, C, A, D, bias)


def _scan_fwd(u, delta, z, B, C, A, D, bias, spec):
    out, last, states = _run(spec, "forward", u, delta, z, B, C, A, D, bias)
    # Named so that a remat policy can keep it (the models' default does): the backward
    # pass then never reruns a forward scan.
    return (out, last), (u, delta, z, B, C, A, D, bias, checkpoint_name(states, "scan_states"))


def _scan_bwd(spec, res, cts):
    grads = _run(spec, "backward", *res, *cts)
    if not spec.has_z:  # z is a stand-in that is never read: no gradient flows to it
        grads = grads[:2] + (jnp.zeros_like(grads[2]),) + grads[3:]
    return grads


_scan.defvjp(_scan_fwd, _scan_bwd)

_PARAM_ARGS = (5, 6, 7)  # A, D, bias: not batched; every other argument is


def _run(spec, stage, *args):
    """``stage`` of the backend each platform runs, per shard of the batch under a mesh."""
    branches = {platform: functools.partial(getattr(impl, stage), spec)
                for platform, impl in _BACKENDS[spec.backend].items()}
    # A, D and bias gradients are per-shard sums.
    return platform.per_shard(lambda *a: platform.dispatch(branches, *a), args, replicated=_PARAM_ARGS,
                              summed=(5, 6, 7) if stage == "backward" else ())


# ----------------------------------------------------------------------------
# Reference backend.


class _Reference:
    """Portable JAX; ``exp`` is the CPU's polynomial one where lowered for the CPU."""

    def __init__(self, exp):
        self.exp = exp

    def primal(self, spec, u, delta, z, B, C, A, D, bias):
        # Not differentiated: no states to save, and small batches scan in segments.
        dt = _dt(delta, bias if spec.has_bias else None, spec.softplus, self.exp)
        segments = num_segments(u.shape[0], u.shape[1])
        if segments > 1:
            y, last = _forward_segmented(dt, u, A, B, C, spec.reverse, segments, self.exp)
        else:
            y, _, last = _forward(dt, u, A, B, C, spec.reverse, self.exp, _INFERENCE_CHUNK)
        return self._output(spec, y, u, z, D), last.transpose(0, 2, 1)

    def forward(self, spec, u, delta, z, B, C, A, D, bias):
        dt = _dt(delta, bias if spec.has_bias else None, spec.softplus, self.exp)
        y, entries, last = _forward(dt, u, A, B, C, spec.reverse, self.exp)
        states = entries.transpose(1, 0, 3, 2)  # the shared layout (batch, chunks, D, N)
        return self._output(spec, y, u, z, D), last.transpose(0, 2, 1), states

    def _output(self, spec, y, u, z, D):
        if spec.has_d:
            y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
        if spec.has_z:
            y = y * z.astype(jnp.float32) * sigmoid(z.astype(jnp.float32), self.exp)
        return y.astype(u.dtype)

    def backward(self, spec, u, delta, z, B, C, A, D, bias, states, g_out, g_last):
        return _backward(spec, u, delta, z, B, C, A, D, bias, states, g_out, g_last, self.exp)


def _portable(spec, u, delta, z, B, C, A, D, bias):
    """The recurrence as one forward ``lax.scan`` of single steps, with no custom VJP and
    no platform choice; reverse is the forward scan of the flipped sequence, flipped back.
    Only operations that converters read (ONNX has no reverse scan). Differentiable by
    JAX's own autodiff, which keeps every state: for export, not training."""
    f32 = jnp.float32
    dt = _dt(delta, bias, spec.softplus, jnp.exp)
    at = A.astype(f32).T
    time_major = lambda x: x.astype(f32).transpose(1, 0, 2)
    xs = tuple(time_major(x) for x in (dt, dt * u.astype(f32), B, C))
    if spec.reverse:
        xs = tuple(jnp.flip(x, 0) for x in xs)

    def step(h, x):
        dt_t, dtu_t, b_t, c_t = x
        h = _advance(h, dt_t, dtu_t, b_t, at, jnp.exp)
        return h, _readout(h, c_t)

    last, y = jax.lax.scan(step, jnp.zeros((u.shape[0],) + at.shape, f32), xs)
    y = (jnp.flip(y, 0) if spec.reverse else y).transpose(1, 0, 2)
    return _REFERENCE._output(spec, y, u, z, D), last.transpose(0, 2, 1)


def _dt(delta, delta_bias, softplus, exp):
    x = delta.astype(jnp.float32)
    if delta_bias is not None:
        x = x + delta_bias.astype(jnp.float32)
    return softplus_formula(x, exp) if softplus else x


def _chunked(x, chunk=STATE_CHUNK):
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


def _advance(h, dt_t, dtu_t, b_t, at, exp):
    """One scan step on states (batch, N, D): h = exp(dt A) h + dt u B."""
    return exp(dt_t[:, None, :] * at) * h + _drive(dtu_t, b_t)


def _readout(h, c_t):
    """<h, C_t> over the state axis, (batch, N, D) -> (batch, D). A multiply and a sum
    rather than an einsum: XLA turns the einsum into a small dot per step, slow on the CPU."""
    return jnp.sum(h * c_t[:, :, None], axis=1)


def _forward(dt, u, A, B, C, reverse, exp, chunk=STATE_CHUNK):
    """Scans states (batch, N, D) float32 (D on the vector lanes).

    Returns y = <h_t, C_t> as (batch, L, D) float32, the chunk-entry states
    (L/chunk, batch, N, D) and the last state (batch, N, D).
    """
    b, l, d = u.shape
    n = A.shape[1]
    at = A.astype(jnp.float32).T  # (N, D)
    xs = tuple(_chunked(x, chunk) for x in (dt, dt * u.astype(jnp.float32), B, C))

    def step(h, x):
        dt_t, dtu_t, b_t, c_t = x
        h = _advance(h, dt_t, dtu_t, b_t, at, exp)
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


def _forward_segmented(dt, u, A, B, C, reverse, segments, exp):
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
    local_end, _ = jax.lax.scan(lambda h, x: (_advance(h, *x, at, exp), None), zeros,
                                (dt_s, dtu_s, b_s), reverse=reverse, unroll=_UNROLL_FWD)
    decay = exp(jnp.sum(dt_s, axis=0)[:, None, :] * at)  # (b*k, n, d): whole-segment decay
    to_k = lambda x: x.reshape(b, k, n, d).transpose(1, 0, 2, 3)
    last, entry = jax.lax.scan(lambda h, x: (x[0] * h + x[1], h), jnp.zeros((b, n, d), jnp.float32),
                               (to_k(decay), to_k(local_end)), reverse=reverse)

    def emit(h, x):
        h = _advance(h, *x[:3], at, exp)
        return h, _readout(h, x[3])

    _, y = jax.lax.scan(emit, entry.transpose(1, 0, 2, 3).reshape(b * k, n, d),
                        (dt_s, dtu_s, b_s, c_s), reverse=reverse, unroll=_UNROLL_FWD)
    y = y.reshape(seg, b, k, d).transpose(1, 2, 0, 3).reshape(b, k * seg, d)[:, :l]
    return y, last


def _backward(spec, u, delta, z, B, C, A, D, bias, states, g_out, g_last, exp):
    """The eight gradients from the chunk-entry states (batch, chunks, D, N)."""
    b, l, d = u.shape
    f32 = jnp.float32
    g = g_out.astype(f32)
    uf = u.astype(f32)
    if spec.has_z:
        zf = z.astype(f32)
        sig = sigmoid(zf, exp)
        gy = g * zf * sig
    else:
        gy = g

    dt = _dt(delta, bias if spec.has_bias else None, spec.softplus, exp)
    at = A.astype(f32).T  # (N, D)
    dtu = dt * uf
    entries = states.transpose(1, 0, 3, 2)  # (chunks, batch, N, D)
    xs = (_chunked(dt), _chunked(dtu), _chunked(B), _chunked(C), _chunked(gy), entries)
    hi = jax.lax.Precision.HIGHEST
    reverse = spec.reverse

    def chunk_grads(carry, x):
        dt_c, dtu_c, b_c, c_c, gy_c, h_entry = x  # (T, batch, .) and (batch, N, D)
        a_c = exp(dt_c[:, :, None, :] * at)  # (T, batch, N, D)

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
        # The output before the gate, for the gate's gradient: rebuilt from the recomputed
        # states rather than saved by the forward.
        y_c = jnp.einsum("tbnd,tbn->tbd", hs, c_c, precision=hi) if spec.has_z else None
        return carry, (lam_b, g_dt, g_b, g_c, y_c)

    lam0 = g_last.astype(f32).transpose(0, 2, 1)
    (_, acc_a), (lam_b, g_dt, g_b, g_c, y_c) = jax.lax.scan(
        chunk_grads, (lam0, jnp.zeros(lam0.shape, f32)), xs, reverse=not reverse)
    gAt = jnp.sum(acc_a, axis=0)
    lam_b, g_dt = _unchunked(lam_b, l), _unchunked(g_dt, l)
    g_b, g_c = _unchunked(g_b, l), _unchunked(g_c, l)
    g_u = dt * lam_b + gy * D.astype(f32)  # D is zeros when absent
    g_dt = g_dt + uf * lam_b
    if spec.has_z:
        y = _unchunked(y_c, l) + D.astype(f32) * uf
        gz = g * y * sig * (1 + zf * (1 - sig))
    else:
        gz = jnp.zeros_like(g)
    gD = jnp.sum(gy * uf, axis=(0, 1))
    if spec.softplus:
        pre = delta.astype(f32) + (bias.astype(f32) if spec.has_bias else 0.0)
        g_dt = g_dt * sigmoid(pre, exp)
    g_bias = jnp.sum(g_dt, axis=(0, 1))
    return (g_u.astype(u.dtype), g_dt.astype(delta.dtype), gz.astype(z.dtype), g_b.astype(B.dtype),
            g_c.astype(C.dtype), gAt.T.astype(A.dtype), gD.astype(D.dtype), g_bias.astype(bias.dtype))


# ----------------------------------------------------------------------------
# Pallas backends and the per-platform table.


class _Pallas:
    """The Pallas kernels (``vim_jax.kernels.selective_scan``): Triton, or interpret mode."""

    module, target = "selective_scan", "cuda"

    def __init__(self, interpret):
        self.interpret = interpret

    def primal(self, spec, *args):
        out, last, _ = self._call("forward", spec, args, save_states=False)
        return out, last

    def forward(self, spec, *args):
        return self._call("forward", spec, args, save_states=True)

    def backward(self, spec, *args):
        return self._call("backward", spec, args)

    def _call(self, name, spec, args, **kw):
        return platform.run_kernel(self.module, name, self.target, self.interpret, args, op=_OP,
                                   softplus=spec.softplus, reverse=spec.reverse, has_z=spec.has_z,
                                   chunk=STATE_CHUNK, **kw)


class _Mosaic(_Pallas):
    """The Mosaic TPU kernels (``vim_jax.kernels.selective_scan_tpu``). ``interpret``: False
    (lowered for TPU only), or ``pltpu.InterpretParams`` (TPU interpret mode on the CPU)."""

    module, target = "selective_scan_tpu", "tpu"

    def __init__(self, interpret=False):
        super().__init__(interpret)


class _NoKernel:
    """A platform without a Pallas kernel: lowering there fails with a message that names
    the platform and the backends that do run there."""

    def __getattr__(self, stage):
        return lambda spec, *args: platform.lowered_only_for(
            None, functools.partial(getattr(_REFERENCE, stage), spec), *args, op=_OP)


_OP = "selective_scan"
_REFERENCE = _Reference(jnp.exp)
_REFERENCE_CPU = _Reference(ops.poly_exp)
_BACKENDS = {
    "auto": dict(cpu=_REFERENCE_CPU, cuda=_Pallas(interpret=False), tpu=_Mosaic(), default=_REFERENCE),
    "reference": dict(cpu=_REFERENCE_CPU, default=_REFERENCE),
    "pallas": dict(cpu=_Pallas(interpret=True), cuda=_Pallas(interpret=False), tpu=_Mosaic(),
                   default=_NoKernel()),
}
