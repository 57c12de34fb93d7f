"""Gated linear attention (GLA), one direction: the token mixer of ViG (arXiv 2405.18425).

Layout (batch, length, heads, dim); per batch entry and head, with ``g`` the log-gate of
each key channel (<= 0) and the state S (dk, dv) in float32:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * q_t^T S_t

(the gate of token t decays the state before token t is added; token t sees itself).
``reverse=True`` runs t from the last position to the first on the same arrays.

Backends:
- "reference": the recurrence itself, one ``lax.scan`` step per token: the oracle.
- "chunked": chunks of ``CHUNK`` tokens: within a chunk, matrix products; between chunks,
  the state recurrence. Every exponent is <= 0: the decay between tokens i >= j of a chunk
  is exp(b_i - b_j) with b the in-chunk cumulative gate, never exp(b_i) * exp(-b_j), which
  overflows for strong gates.
Both are differentiated by JAX. "auto" is the chunked form: measured on a 2-core CPU at
ViG-T's shapes (batch 8, 196 tokens, 3 heads, dk 32, dv 64) it takes 30 ms for a forward and
backward against the recurrence's 79 ms, though 6.3 ms against 2.5 ms for a forward alone.
Equations and the official code's conventions: ../shared/design/vig.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "reference", "chunked")
CHUNK = 16
_HI = jax.lax.Precision.HIGHEST


def gla(q, k, v, g, *, reverse: bool = False, scale=None, return_final_state: bool = False,
        backend: str = "auto"):
    """One direction of gated linear attention.

    Args:
      q, k: (batch, length, heads, dk); v: (batch, length, heads, dv).
      g: (batch, length, heads, dk) log-gates (<= 0; the decay is exp(g)).
      reverse: scan from the last position to the first.
      scale: multiplies q; default dk ** -0.5.
      return_final_state: also return the state after the last step, (batch, heads, dk, dv)
        float32.
      backend: "auto" (the chunked form), "reference" or "chunked".

    Returns:
      o: (batch, length, heads, dv) in q's dtype; and the final state if asked for.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if q.ndim != 4:
        raise ValueError(f"q must be (batch, length, heads, dk), got shape {q.shape}")
    for name, x in (("k", k), ("g", g)):
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {x.shape}; it must be q's, {q.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v has shape {v.shape}; it must be (batch, length, heads) = "
                         f"{q.shape[:3]} followed by dv")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = _recurrent if backend == "reference" else _chunked
    if reverse:
        flip = lambda x: jnp.flip(x, 1)
        o, state = fn(flip(q), flip(k), flip(v), flip(g), scale)
        o = flip(o)
    else:
        o, state = fn(q, k, v, g, scale)
    o = o.astype(q.dtype)
    return (o, state) if return_final_state else o


def bigla(q, k, v, g_fwd, g_bwd, *, scale=None, backend: str = "auto"):
    """Both directions of gated linear attention on the same q, k, v: ViG's token mixer.

    Args:
      q, k: (batch, length, heads, dk); v: (batch, length, heads, dv).
      g_fwd, g_bwd: (batch, length, heads, dk) log-gates (<= 0) of the forward scan and of
        the reverse scan; index t gates token t in both.
      scale, backend: as for ``gla``.

    Returns:
      (o_fwd, o_bwd), each (batch, length, heads, dv) in q's dtype: ``gla(q, k, v, g_fwd)``
      and ``gla(q, k, v, g_bwd, reverse=True)``, computed as one batch of twice the size
      (the reverse direction on flipped copies), so one launch serves both.
    """
    if g_bwd.shape != g_fwd.shape:
        raise ValueError(f"g_bwd has shape {g_bwd.shape}; it must be g_fwd's, {g_fwd.shape}")
    flip = lambda x: jnp.flip(x, 1)
    both = lambda a, b: jnp.concatenate([a, flip(b)], axis=0)
    o = gla(both(q, q), both(k, k), both(v, v), both(g_fwd, g_bwd), scale=scale, backend=backend)
    o_fwd, o_bwd = jnp.split(o, 2, axis=0)
    return o_fwd, flip(o_bwd)


def _recurrent(q, k, v, g, scale):
    b, _, h, dk = q.shape
    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g))

    def step(state, x):
        q_t, k_t, v_t, g_t = x
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=_HI)

    state, o = jax.lax.scan(step, jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), state


def _chunked(q, k, v, g, scale, chunk: int = CHUNK):
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    n = -(-l // chunk)

    def chunks(x):  # (b, l, h, d) -> (n, b, h, chunk, d); zero padding: identity steps at the end
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * chunk - l), (0, 0), (0, 0)))
        return x.reshape(b, n, chunk, h, -1).transpose(1, 0, 3, 2, 4)

    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[..., None]

    def step(state, x):
        q_c, k_c, v_c, g_c = x
        cum = jnp.cumsum(g_c, axis=-2)  # b_i: <= 0, non-increasing along the chunk
        inter = jnp.einsum("bhck,bhkv->bhcv", q_c * jnp.exp(cum), state, precision=_HI)
        # exp(b_i - b_j) for j <= i (<= 0); the select precedes the exp, so j > i never
        # exponentiates a positive difference (nor feeds one to the gradient).
        diff = cum[..., :, None, :] - cum[..., None, :, :]
        decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
        # Not the three-operand einsum: compiled for one chunk at ViG-T's head sizes, XLA's
        # CPU (jax 0.10.2) fused that form into a kernel reading uninitialised memory.
        scores = jnp.einsum("bhijk,bhjk->bhij", q_c[..., :, None, :] * decay, k_c, precision=_HI)
        intra = jnp.einsum("bhij,bhjv->bhiv", scores, v_c, precision=_HI)
        last = cum[..., -1, :]
        carried = k_c * jnp.exp(last[..., None, :] - cum)
        state = jnp.exp(last)[..., None] * state + jnp.einsum("bhck,bhcv->bhkv", carried, v_c,
                                                               precision=_HI)
        return state, scale * (inter + intra)

    state, o = jax.lax.scan(step, jnp.zeros((b, h, dk, dv), jnp.float32),
                            tuple(chunks(x) for x in (q, k, v, g)))
    return o.transpose(1, 0, 3, 2, 4).reshape(b, n * chunk, h, dv)[:, :l], state
