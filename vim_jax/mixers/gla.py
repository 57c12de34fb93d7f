"""Gated linear attention (GLA): the token mixer of ViG (arXiv 2405.18425).

Layout (batch, length, heads, dim); per batch entry and head, with ``g`` the log-gate of
each key channel (<= 0) and the state S (dk, dv) in float32:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * q_t^T S_t

(the gate of token t decays the state before token t is added; token t sees itself).
``reverse=True`` runs t from the last position to the first on the same arrays.

Backends, chosen by the platform the program is lowered for (``vim_jax.mixers.platform``),
as the selective scan's are:

    backend      cpu                  cuda                  tpu                   other (rocm)
    "auto"       chunked              Pallas (Triton)       Pallas (Mosaic)       chunked
    "reference"  the recurrence, one ``lax.scan`` step per token: the oracle, everywhere
    "chunked"    chunks of ``CHUNK`` tokens in XLA, everywhere
    "pallas"     Pallas, interpret    Pallas (Triton)       Pallas (Mosaic)       error at lowering

The chunked form: within a chunk, matrix products; between chunks, the state recurrence.
Every exponent is <= 0: the decay between tokens i >= j of a chunk is exp(b_i - b_j) with b
the in-chunk cumulative gate, never exp(b_i) * exp(-b_j), which overflows for strong gates.
Its custom VJP saves the inputs and the state entering every chunk and recomputes each
chunk's decays on the way back: a gradient at ViG-T's heads (batch 8, 196 tokens, both
directions) held 26.9 MiB of temporaries against 70.6 with JAX's own derivative, which kept
them all, and a ViG-T train step at batch 8 0.71 GiB against 1.22 (compiled memory), no
slower (47 against 50 ms for a forward and backward; 2-core CPU running other work,
2026-12-05). It walks every direction on the arrays as they are (a reverse direction reads
its chunks from the end, flipped in the chunk), with no flipped or chunked copies of whole
sequences (only zeros padded after the end when the length is not a multiple of ``CHUNK``):
that gradient now holds 24.0 MiB, and both directions at ViG-T's 1024 px shapes (batch 1,
4096 tokens) 6.4 MiB of temporaries against 18.0 (commit 2c36c1a); times on the 2-core CPU,
2026-12-06: 11.8 against 8.9 ms for a forward at 196 tokens and batch 8 (the walk's
per-chunk reads), 37.9 against 36.2 with the backward; 30.9 against 31.2 and 120.7 against
125.7 ms at 4096 tokens. JAX differentiates the recurrence. On the CPU the chunked form is
the fastest:
at ViG-T's shapes (batch 8, 196 tokens, 3 heads, dk 32, dv 64, 2-core CPU, before its custom
VJP) 30 ms for a forward and backward against the recurrence's 79 ms, though 6.3 ms against
2.5 ms for a forward alone.
The Pallas kernels (``vim_jax.kernels.gla`` for CUDA, ``vim_jax.kernels.gla_tpu`` for TPU)
run the same chunked algorithm with both directions of ``bigla`` in one launch, under one
custom VJP whose residuals (the state entering every chunk, in each family's own layout) are
named "gla_states" and the output "gla" for remat policies; under a mesh, per device on its
share of the batch. The Triton kernels take any head size (q, k, g and v zero-padded to
tiles of a power of two, at least 16; ViG's sizes need none); the Mosaic kernels lay every
head of a token side by side on the vector lanes and take any size as it is. "pallas" on
the CPU runs the Triton kernels in interpret mode (``tpu_interpret.run_tpu_kernels_on_cpu``
switches it to the TPU kernels in TPU interpret mode). On an NVIDIA H200 (commit 250aff8,
2026-11-27) the Triton kernels take 0.53 ms forward and 1.67 ms forward + backward at
ViG-T's shapes, batch 128 at 224 px, against the chunked form's 1.07 and 4.08 ms; 1.94 and
8.8 ms against 5.96 and 26.2 ms at 1024 px, batch 32. No TPU has run the Mosaic kernels
(compiled for v5e and interpret-verified: docs/tpu.md).
Equations and the official code's conventions: docs/mixers.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vim_jax.mixers import platform

BACKENDS = ("auto", "reference", "chunked", "pallas")
CHUNK = 16
_HI = jax.lax.Precision.HIGHEST
_OP = "gla"


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
      backend: "auto", "reference", "chunked" or "pallas" (see the module docstring).

    Returns:
      o: (batch, length, heads, dv) in q's dtype; and the final state if asked for.
    """
    _check(q, k, v, backend, g=g)
    o, state = _directions(q, k, v, g[:, :, None], (reverse,), _scale(q, scale), backend)
    o, state = o[:, :, 0], state[:, 0]
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
      and ``gla(q, k, v, g_bwd, reverse=True)``. The Pallas kernels and the chunked form
      run both in one walk over the chunks on the arrays as they are; the recurrence runs
      them as one batch of twice the size (the reverse on flipped copies).
    """
    _check(q, k, v, backend, g=g_fwd)
    if g_bwd.shape != g_fwd.shape:
        raise ValueError(f"g_bwd has shape {g_bwd.shape}; it must be g_fwd's, {g_fwd.shape}")
    o, _ = _directions(q, k, v, jnp.stack([g_fwd, g_bwd], 2), (False, True), _scale(q, scale), backend)
    return o[:, :, 0], o[:, :, 1]


def _scale(q, scale):
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _check(q, k, v, backend, g):
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


def _directions(q, k, v, g, directions, scale, backend):
    """o (b, L, R, h, dv) in q's dtype and final states (b, R, h, dk, dv) of the R
    directions, g (b, L, R, h, dk) holding each direction's gates."""
    kernel = lambda family: lambda *a: family.call(*a, scale=scale, directions=directions)
    if backend == "pallas":
        return platform.dispatch({p: kernel(f) for p, f in _PALLAS.items()}, q, k, v, g)
    xla = functools.partial(_xla if backend == "reference" else _chunked, directions=directions, scale=scale)
    if backend == "auto":
        return platform.dispatch(dict({p: kernel(f) for p, f in _AUTO.items()}, default=xla), q, k, v, g)
    return xla(q, k, v, g)


class _Triton:
    """The Triton kernels (``vim_jax.kernels.gla``), at any head size: q, k, g padded with
    zeros to ``block_size(dk)`` channels and v to ``block_size(dv)`` (nothing to pad at
    ViG's sizes), the output and final state cut back; the scale stays the true dk's.
    ``by_name``: asked for as backend="pallas" (interpret mode on the CPU, an error where no
    kernel exists) rather than chosen by "auto" for CUDA."""

    module, target = "gla", "cuda"

    def __init__(self, by_name: bool):
        self.by_name = by_name

    def call(self, q, k, v, g, *, scale, directions):
        from vim_jax.kernels import gla as kernels
        dk, dv = q.shape[-1], v.shape[-1]
        pk, pv = kernels.block_size(dk), kernels.block_size(dv)
        spec = (scale, directions, self)
        if (pk, pv) == (dk, dv):
            return _kernel(q, k, v, g, spec)
        pad = lambda x, size: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
        o, state = _kernel(pad(q, pk), pad(k, pk), pad(v, pv), pad(g, pk), spec)
        return o[..., :dv], state[..., :dk, :dv]

    def stage(self, stage, scale, directions, args, kw):
        kernel = lambda target, interpret: lambda *a: platform.run_kernel(
            self.module, stage, target, interpret, a, op=_OP, scale=scale, directions=directions, **kw)
        # Inside "auto"'s CUDA branch, other platforms never select this: the Triton call
        # (zeros there) serves. By name: interpret mode on the CPU, an error where no
        # kernel exists.
        triton = kernel(self.target, False)
        branches = dict(cuda=triton, default=triton)
        if self.by_name:
            branches.update(cpu=kernel(None, True), default=kernel(None, False))
        return platform.per_shard(lambda *a: platform.dispatch(branches, *a), args)


class _Mosaic:
    """The Mosaic TPU kernels (``vim_jax.kernels.gla_tpu``): lane-dense rows, any head size.
    ``interpret``: False (lowered for TPU only), or ``pltpu.InterpretParams`` (the tests'
    TPU interpret mode on the CPU)."""

    module, target = "gla_tpu", "tpu"

    def __init__(self, interpret=False):
        self.interpret = interpret

    def call(self, q, k, v, g, *, scale, directions):
        return _kernel(q, k, v, g, (scale, directions, self))

    def stage(self, stage, scale, directions, args, kw):
        return platform.per_shard(lambda *a: platform.run_kernel(
            self.module, stage, self.target, self.interpret, a, op=_OP, scale=scale, directions=directions,
            **kw), args)


_AUTO = dict(cuda=_Triton(by_name=False), tpu=_Mosaic())
_PALLAS = dict(tpu=_Mosaic(), default=_Triton(by_name=True))


def _xla(q, k, v, g, *, directions, scale):
    """The recurrence's XLA form: every reverse direction on flipped copies, all directions
    as one batch."""
    r = len(directions)
    flip = lambda x, rev: jnp.flip(x, 1) if rev else x
    if r == 1:  # no batch concatenation: converters cannot split a symbolic batch
        o, state = _recurrent(*(flip(x if x.ndim == 4 else x[:, :, 0], directions[0]) for x in (q, k, v, g)), scale)
        return flip(o, directions[0]).astype(q.dtype)[:, :, None], state[:, None]
    cat = lambda x: jnp.concatenate([flip(x if x.ndim == 4 else x[:, :, i], rev)
                                     for i, rev in enumerate(directions)], 0)
    o, state = _recurrent(cat(q), cat(k), cat(v), cat(g), scale)
    o = jnp.stack([flip(x, rev) for x, rev in zip(jnp.split(o, r, 0), directions)], 2)
    return o.astype(q.dtype), jnp.stack(jnp.split(state, r, 0), 1)


# ----------------------------------------------------------------------------
# The Pallas kernels under one custom VJP. spec = (scale, directions, family): the family
# (``_Triton`` or ``_Mosaic``) runs its own kernels' forward and backward, whose residuals
# only it reads.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(q, k, v, g, spec):
    return _stage("forward", spec, q, k, v, g, save_states=False)


def _kernel_fwd(q, k, v, g, spec):
    o, last, states = _stage("forward", spec, q, k, v, g, save_states=True)
    # Named for remat policies (the models' remat="mixer"): the backward never reruns the
    # forward kernel when these are kept.
    o = checkpoint_name(o, "gla")
    states, last = (checkpoint_name(x, "gla_states") for x in (states, last))
    return (o, last), (q, k, v, g, states, last)


def _kernel_bwd(spec, res, cts):
    return _stage("backward", spec, *res, *cts)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _stage(stage, spec, *args, **kw):
    scale, directions, family = spec
    return family.stage(stage, scale, directions, args, kw)


def _recurrent(q, k, v, g, scale):
    b, _, h, dk = q.shape
    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g))

    def step(state, x):
        q_t, k_t, v_t, g_t = x
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=_HI)

    state, o = jax.lax.scan(step, jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), state


def _chunked(q, k, v, g, *, directions, scale, chunk: int = CHUNK):
    """The chunked form of R directions, walked on the arrays as they are: q, k (b, L, h,
    dk) and v (b, L, h, dv) shared, g (b, L, R, h, dk) holding each direction's gates ->
    o (b, L, R, h, dv) in q's dtype and the final states (b, R, h, dk, dv) float32."""
    o, state = _chunked_vjp(q, k, v, g, scale, directions, chunk)
    return o.astype(q.dtype), state


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_vjp(q, k, v, g, scale, directions, chunk):
    o, state, _ = _chunked_forward(q, k, v, g, scale, directions, chunk)
    return o, state


def _chunked_fwd(q, k, v, g, scale, directions, chunk):
    o, state, entries = _chunked_forward(q, k, v, g, scale, directions, chunk)
    # What the backward needs beyond the inputs: the state entering every chunk in walking
    # order, (n, b, R, h, dk, dv) float32, and the last; JAX's own derivative of the scan
    # would keep every chunk's (C, C, dk) decays and scores instead. Named as the kernels'
    # residuals and output are, so ViG's remat="mixer" keeps them and never reruns this
    # forward on any platform.
    o = checkpoint_name(o, "gla")
    entries, state = (checkpoint_name(x, "gla_states") for x in (entries, state))
    return (o, state), (q, k, v, g, entries, state)


class _Walk:
    """Chunk i of the walk, for every direction at once: a reverse direction takes chunk
    n - 1 - i of the arrays as they are, flipped in the chunk, so no flipped copy of a whole
    sequence is ever made (XLA keeps such copies, a layer's worth of q, k, v, g, alive)."""

    def __init__(self, length, chunk, directions):
        self.n, self.chunk, self.directions = -(-length // chunk), chunk, directions
        self.length, self.padded = length, self.n * chunk

    def pad(self, x):
        """Zeros after the end (b, L, ...) -> (b, n * chunk, ...): identity steps, in either
        direction (zero keys and values add nothing, zero gates decay nothing)."""
        extra = self.padded - self.length
        return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2)) if extra else x

    def _start(self, i, rev):
        return (self.n - 1 - i if rev else i) * self.chunk

    def read(self, x, i, per_direction: bool = False):
        """(b, n * chunk, [R,] h, d) -> (b, R, h, chunk, d) float32 in walking order."""
        parts = []
        for r, rev in enumerate(self.directions):
            c = jax.lax.dynamic_slice_in_dim(x, self._start(i, rev), self.chunk, axis=1)
            c = c[:, :, r] if per_direction else c
            parts.append(jnp.flip(c, 1) if rev else c)
        return jnp.stack(parts, 1).astype(jnp.float32).transpose(0, 1, 3, 2, 4)

    def write(self, buf, c, i):
        """(b, R, h, chunk, d) in walking order into buf (b, n * chunk, R, h, d)."""
        c = c.transpose(0, 1, 3, 2, 4)
        for r, rev in enumerate(self.directions):
            part = jnp.flip(c[:, r], 1) if rev else c[:, r]
            buf = jax.lax.dynamic_update_slice(buf, part[:, :, None], (0, self._start(i, rev), r, 0, 0))
        return buf

    def buffer(self, like, d):
        """A (b, n * chunk, R, h, d) float32 buffer every chunk of the walk overwrites. Made
        from ``like`` (its values never read) rather than zeros: XLA's CPU schedule makes a
        buffer of constants at the program's start, one a layer, all live at once."""
        b, _, h = like.shape[:3]
        shape = (b, self.padded, len(self.directions), h, d)
        return jnp.broadcast_to(like[:, :, None, :, :1].astype(jnp.float32), shape)


def _decays(cum, causal):
    """(..., C, C, dk): exp(b_i - b_j) for j <= i (<= 0), else 0; the select precedes the exp,
    so j > i never exponentiates a positive difference."""
    return jnp.exp(jnp.where(causal, cum[..., :, None, :] - cum[..., None, :, :], -jnp.inf))


def _chunked_forward(q, k, v, g, scale, directions, chunk):
    """o (b, L, R, h, dv) float32, the final states (b, R, h, dk, dv) and the state entering
    every chunk in walking order (n, b, R, h, dk, dv): for a reverse direction, entry i is
    the state entering chunk n - 1 - i."""
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    walk = _Walk(l, chunk, directions)
    q, k, v, g = (walk.pad(x) for x in (q, k, v, g))
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[..., None]

    def step(carry, i):
        state, out = carry
        q_c, k_c, v_c = (walk.read(x, i) for x in (q, k, v))
        g_c = walk.read(g, i, per_direction=True)
        cum = jnp.cumsum(g_c, axis=-2)  # b_i: <= 0, non-increasing along the chunk
        inter = jnp.einsum("brhck,brhkv->brhcv", q_c * jnp.exp(cum), state, precision=_HI)
        decay = _decays(cum, causal)
        # Not the three-operand einsum: compiled for one chunk at ViG-T's head sizes, XLA's
        # CPU (jax 0.10.2) fused that form into a kernel reading uninitialised memory.
        scores = jnp.einsum("brhijk,brhjk->brhij", q_c[..., :, None, :] * decay, k_c, precision=_HI)
        intra = jnp.einsum("brhij,brhjv->brhiv", scores, v_c, precision=_HI)
        last = cum[..., -1, :]
        carried = k_c * jnp.exp(last[..., None, :] - cum)
        new = jnp.exp(last)[..., None] * state + jnp.einsum("brhck,brhcv->brhkv", carried, v_c, precision=_HI)
        return (new, walk.write(out, scale * (inter + intra), i)), state

    init = (jnp.zeros((b, len(directions), h, dk, dv), jnp.float32), walk.buffer(v, dv))
    (state, o), entries = jax.lax.scan(step, init, jnp.arange(walk.n))
    return o[:, :l], state, entries


def _chunked_bwd(scale, directions, chunk, res, cts):
    """Walks the chunks back from the saved entry states, recomputing each chunk's decays:
    dq, dk, dv as the kernels' backward computes them (summed over the directions), and each
    direction's dg as the cumulative sum, against its walk, of q dq - k dk plus the final
    state's own term (scaling every gate by e^eps scales the final state by e^eps)."""
    q, k, v, g, entries, last = res
    do, dlast = cts
    b, l, h, dk = q.shape
    walk = _Walk(l, chunk, directions)
    qp, kp, vp, gp, dop = (walk.pad(x) for x in (q, k, v, g, do))
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[..., None]

    def step(carry, x):
        ds, bufs = carry  # ds: the adjoint of the state leaving the chunk
        i, state = x
        q_c, k_c, v_c = (walk.read(a, i) for a in (qp, kp, vp))
        g_c, do_c = (walk.read(a, i, per_direction=True) for a in (gp, dop))
        do_c = scale * do_c
        cum = jnp.cumsum(g_c, axis=-2)
        last_c = cum[..., -1:, :]
        decay = _decays(cum, causal)
        q_decay, k_decay = jnp.exp(cum), jnp.exp(last_c - cum)
        scores = jnp.einsum("brhijk,brhjk->brhij", q_c[..., :, None, :] * decay, k_c, precision=_HI)
        dscores = jnp.where(causal[..., 0], jnp.einsum("brhiv,brhjv->brhij", do_c, v_c, precision=_HI), 0.0)
        weighted = dscores[..., None] * decay  # (b, R, h, C, C, dk)
        dq = q_decay * jnp.einsum("brhiv,brhkv->brhik", do_c, state, precision=_HI) + \
            jnp.einsum("brhijk,brhjk->brhik", weighted, k_c, precision=_HI)
        dk_ = k_decay * jnp.einsum("brhjv,brhkv->brhjk", v_c, ds, precision=_HI) + \
            jnp.einsum("brhijk,brhik->brhjk", weighted, q_c, precision=_HI)
        dv = jnp.einsum("brhij,brhiv->brhjv", scores, do_c, precision=_HI) + \
            jnp.einsum("brhjk,brhkv->brhjv", k_c * k_decay, ds, precision=_HI)
        ds = jnp.exp(last_c[..., 0, :])[..., None] * ds + \
            jnp.einsum("brhik,brhiv->brhkv", q_c * q_decay, do_c, precision=_HI)
        bufs = tuple(walk.write(buf, c, i) for buf, c in zip(bufs, (dq, dk_, dv, q_c * dq - k_c * dk_)))
        return (ds, bufs), None

    bufs = tuple(walk.buffer(a, d) for a, d in ((qp, dk), (kp, dk), (vp, v.shape[-1]), (gp[:, :, 0], dk)))
    (_, (dq, dk_, dv, term)), _ = jax.lax.scan(step, (dlast.astype(jnp.float32), bufs),
                                               (jnp.arange(walk.n), entries), reverse=True)
    dq, dk_, dv = (x[:, :l].sum(2) for x in (dq, dk_, dv))
    # Each direction's gate gradient sums its walk's later terms: towards the end of the
    # sequence for the forward walk, towards its start for the reverse one.
    dg = jnp.stack([jax.lax.cumsum(term[:, :l, r], axis=1, reverse=not rev)
                    for r, rev in enumerate(directions)], 2)
    dg = dg + jnp.sum(last * dlast.astype(jnp.float32), axis=-1)[:, None]  # (b, R, h, dk)
    return tuple(d.astype(x.dtype) for d, x in zip((dq, dk_, dv, dg), (q, k, v, g)))


_chunked_vjp.defvjp(_chunked_fwd, _chunked_bwd)
