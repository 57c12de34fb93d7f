"""Plain ViG (gated linear attention, arXiv 2405.18425) in Flax NNX, and the token mixer
its hierarchical sibling (``vig_h.py``) shares.

Shapes: images NHWC; tokens (batch, L, D) row-major over the patch grid, no class token.
The residual stream is float32 whatever the compute dtype. The architecture, the
per-variant switches and the official code's conventions: docs/vig.md.

Train and eval differ as in the official code: in training the mixer averages the two
directions, (o_f + o_b) / 2; in eval mode plain ViG divides by 4 (the official evaluation
kernel already averages and ``vig.py`` halves again), so official weights give official
logits. RMSNorm follows, so the factor only moves its epsilon's share.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vim_jax.mixers.gla import BACKENDS as GLA_BACKENDS, bigla, gla
from vim_jax.models.vim import RMSNorm, check_images, drop_path, embed_patches, torch_default_init

RMS_EPS = 1e-6  # every RMSNorm of both ViG families
LN_EPS = 1e-5  # LayerNorm2d (torch's default)
GATE_LOGIT_NORMALIZER = 16
GATE_RANK = 16
REMAT = ("none", "mixer", "full")


def check_remat(remat: str) -> None:
    """Raises ValueError unless ``remat`` is one of ``REMAT`` (both ViG families' choices)."""
    if remat not in REMAT:
        raise ValueError(f"remat={remat!r} is not one of {REMAT} (\"full\": each block "
                         "recomputed in the backward pass; \"mixer\": the same, but the GLA "
                         "kernel's output and saved states kept)")


def remat_block(call, remat: str):
    """``call`` (a block's forward) with the block's activations recomputed in the backward
    pass: all of them ("full"), all but the Pallas GLA kernel's named residuals ("mixer",
    so the backward never reruns the forward kernel), or none ("none")."""
    if remat == "none":
        return call
    policy = (jax.checkpoint_policies.save_only_these_names("gla", "gla_states")
              if remat == "mixer" else None)
    return nnx.remat(call, policy=policy)


def xavier_uniform(gain: float):
    """torch.nn.init.xavier_uniform_ with ``gain`` (the official mixer's init, gain 2^-2.5)."""
    return nnx.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


def swiglu_hidden(dim: int, multiple: int) -> int:
    """The SwiGLU hidden width: int(8 * dim / 3) rounded up to ``multiple`` (256 plain, 32 ViG-H)."""
    return multiple * -(-int(dim * 4 * 2 / 3) // multiple)


def _cubic_weights(t, a=-0.75):
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (torch's bicubic)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's 1-D bicubic resize (``F.interpolate(mode="bicubic",
    align_corners=False)``: half-pixel centres, A = -0.75, no antialias, edge taps clamped)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((n_out, n_in))
    for tap in range(4):
        idx = np.clip(base.astype(int) - 1 + tap, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, tap])
    return m


def resize_pos_embed(pos, old_grid, new_grid):
    """(1, gh*gw, D) position embedding -> (1, nh*nw, D) as the official ViG resizes it
    (torch's bicubic with align_corners=False), so official weights give official logits at
    any input size."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    rows = jnp.asarray(torch_bicubic_matrix(old_grid[0], new_grid[0]), jnp.float32)
    cols = jnp.asarray(torch_bicubic_matrix(old_grid[1], new_grid[1]), jnp.float32)
    grid = pos.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
    out = jnp.einsum("ih,hwd,jw->ijd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos.dtype)


def _dense(cin, cout, *, bias, init, dtype, rngs):
    return nnx.Linear(cin, cout, use_bias=bias, kernel_init=init, dtype=dtype, rngs=rngs)


def _conv(cin, cout, kernel, stride, *, dtype, rngs, groups=1, bias=True, init=torch_default_init):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((1, 1), (1, 1)),
                    feature_group_count=groups, use_bias=bias, kernel_init=init, dtype=dtype,
                    rngs=rngs)


def layer_norm(dim, rngs):
    """LayerNorm over channels (the official LayerNorm2d), exact variance."""
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_fast_variance=False, rngs=rngs)


RUN_ELEMENTS = 1 << 20


def run_tokens(module: nnx.Module, hidden: int, length: int) -> int:
    """Tokens a run of ``over_tokens`` takes in ``module`` when its widest per-token value has
    ``hidden`` channels: about ``RUN_ELEMENTS`` values an image (a 224 px image in one run)
    in eval mode; the whole ``length`` in training, where the loop's derivative costs memory
    (UperNet-ViG-H-T's train step on a v5e chip: 5.89 GiB in runs against 5.46 whole), and
    in export mode (``portable``: converters get no loop)."""
    evaluating = module.deterministic and not module.portable
    return max(1, RUN_ELEMENTS // hidden) if evaluating else length


def over_tokens(fn, x, *others, tokens: int):
    """``fn(x, *others)`` for a token-wise ``fn`` that returns x's shape, computed in runs of
    ``tokens`` tokens written over x's: x (batch, L, D), each of ``others`` (batch, L, ...).
    A loop when L holds at least two runs (the last run takes what is left over), so that
    one run's temporaries are live at a time, not the whole sequence's."""
    l = x.shape[1]
    n = l // tokens
    if n <= 1:
        return fn(x, *others)
    cut = lambda a, start, size: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)

    def run(i, y):
        start = i * tokens
        part = fn(cut(y, start, tokens), *(cut(a, start, tokens) for a in others))
        return jax.lax.dynamic_update_slice_in_dim(y, part, start, axis=1)

    y = jax.lax.fori_loop(0, n, run, x)
    if l > n * tokens:
        y = y.at[:, n * tokens:].set(fn(y[:, n * tokens:], *(a[:, n * tokens:] for a in others)))
    return y


class BiGLA(nnx.Module):
    """ViG's token mixer on a (batch, H, W, D) grid -> (batch, H*W, D) tokens.

    Depthwise 3x3 conv -> q, k, v (one projection) and rank-16 per-direction log-gates ->
    gated linear attention both ways (``vim_jax.mixers.gla.bigla``) -> per-head RMSNorm ->
    a sigmoid gate mixes it with the per-head-normed conv output -> o_proj.
    """

    def __init__(self, dim: int, num_heads: int, *, act_in_conv: bool, out_act: bool,
                 eval_halves: bool, linear_init, dtype=jnp.float32, gla_backend: str = "auto",
                 rngs: nnx.Rngs):
        if dim % (2 * num_heads):
            raise ValueError(f"width {dim} must be a multiple of 2 * num_heads = {2 * num_heads}")
        if gla_backend not in GLA_BACKENDS:
            raise ValueError(f"gla_backend={gla_backend!r} is not one of {GLA_BACKENDS}")
        self.dim, self.num_heads, self.key_dim = dim, num_heads, dim // 2
        self.act_in_conv, self.out_act, self.eval_halves = act_in_conv, out_act, eval_halves
        self.dtype, self.gla_backend = dtype, gla_backend
        self.deterministic = True
        self.portable = False  # export mode: one call per direction, no doubled batch
        xavier = xavier_uniform(2 ** -2.5)
        self.dwconv = _conv(dim, dim, 3, 1, groups=dim, bias=False, init=xavier, dtype=dtype, rngs=rngs)
        self.qkv_proj = _dense(dim, 2 * self.key_dim + dim, bias=False, init=linear_init(xavier),
                               dtype=dtype, rngs=rngs)
        self.gk_down = _dense(dim, GATE_RANK, bias=False, init=linear_init(xavier), dtype=dtype, rngs=rngs)
        self.gk_up = _dense(GATE_RANK, 2 * self.key_dim, bias=True, init=linear_init(xavier),
                            dtype=dtype, rngs=rngs)
        self.g_proj = _dense(dim, dim, bias=True, init=linear_init(xavier), dtype=dtype, rngs=rngs)
        self.o_proj = _dense(dim, dim, bias=False, init=linear_init(xavier), dtype=dtype, rngs=rngs)
        self.g_norm = RMSNorm(dim // num_heads, RMS_EPS)
        self.l_norm = RMSNorm(dim // num_heads, RMS_EPS)

    def __call__(self, x):
        b, gh, gw, d = x.shape
        h, kd = self.num_heads, self.key_dim
        xc = self.dwconv(x.astype(self.dtype))
        if self.act_in_conv:
            xc = jax.nn.silu(xc)
        xs = xc.reshape(b, gh * gw, d)
        heads = lambda t: t.reshape(*t.shape[:2], h, -1)
        q, k, v = jnp.split(self.qkv_proj(xs), [kd, 2 * kd], axis=-1)
        gates = jax.nn.log_sigmoid(self.gk_up(self.gk_down(xs)).astype(jnp.float32)) / GATE_LOGIT_NORMALIZER
        g_fwd, g_bwd = jnp.split(gates, 2, axis=-1)
        q, k, v, g_fwd, g_bwd = map(heads, (q, k, v, g_fwd, g_bwd))
        if self.portable:  # converters such as jax2onnx read plain XLA, one direction a call
            backend = "reference" if self.gla_backend == "reference" else "chunked"
            o_fwd = gla(q, k, v, g_fwd, backend=backend)
            o_bwd = gla(q, k, v, g_bwd, reverse=True, backend=backend)
        else:
            o_fwd, o_bwd = bigla(q, k, v, g_fwd, g_bwd, backend=self.gla_backend)
        halve = 0.25 if (self.deterministic and self.eval_halves) else 0.5

        def mix(xs, o_fwd, o_bwd):  # token-wise: over runs of tokens, written over xs
            o = self.g_norm((o_fwd.astype(jnp.float32) + o_bwd.astype(jnp.float32)) * halve)
            local = self.l_norm(heads(xs))
            gate = jax.nn.sigmoid(heads(self.g_proj(xs)).astype(jnp.float32))
            o = (o * gate + local * (1 - gate)).reshape(xs.shape).astype(self.dtype)
            if self.out_act:
                o = jax.nn.silu(o)
            return self.o_proj(o).astype(xs.dtype)

        return over_tokens(mix, xs, o_fwd, o_bwd, tokens=run_tokens(self, 4 * d, gh * gw))


class SwiGLU(nnx.Module):
    """``down(silu(a) * b)`` with ``a, b = split(up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int, *, init, dtype=jnp.float32, rngs: nnx.Rngs):
        self.up = _dense(dim, 2 * hidden, bias=False, init=init, dtype=dtype, rngs=rngs)
        self.down = _dense(hidden, dim, bias=False, init=init, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        a, b = jnp.split(self.up(x), 2, axis=-1)
        return self.down(jax.nn.silu(a) * b)


class Block(nnx.Module):
    """``r = x + drop_path(attn(RMSNorm(x)))``; ``r + drop_path(mlp(RMSNorm(r)))``, the MLP
    over runs of tokens in eval mode (``over_tokens``)."""

    def __init__(self, dim: int, num_heads: int, *, mixer_kw, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(dim, RMS_EPS)
        self.attn = BiGLA(dim, num_heads, linear_init=lambda xavier: xavier, dtype=dtype,
                          rngs=rngs, **mixer_kw)
        self.mlp_norm = RMSNorm(dim, RMS_EPS)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, 256), init=nnx.initializers.normal(0.02),
                          dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.deterministic = True  # eval mode (model.train() clears it); drop path has its own flag
        self.portable = False  # export mode (set_attributes): one run, no loop for converters

    def __call__(self, x, grid, rate, keys, deterministic):
        b, _, d = x.shape
        h = self.attn(self.attn_norm(x).astype(self.dtype).reshape(b, *grid, d))
        x = x + drop_path(h, rate, keys[0], deterministic).astype(jnp.float32)

        def mlp(x):  # the same key in every run: the same samples dropped
            h = self.mlp(self.mlp_norm(x).astype(self.dtype))
            return x + drop_path(h, rate, keys[1], deterministic).astype(jnp.float32)

        return over_tokens(mlp, x, tokens=run_tokens(self, 2 * self.mlp.down.in_features, x.shape[1]))


class PatchEmbed(nnx.Module):
    """Conv(k9, s8, p1) -> LayerNorm -> SiLU -> Conv(k3, s2, p1) -> LayerNorm: stride 16."""

    def __init__(self, in_chans: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(in_chans, dim // 2, 9, 8, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim // 2, rngs)
        self.conv2 = _conv(dim // 2, dim, 3, 2, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs)
        self.dtype = dtype

    def __call__(self, images):
        x = jax.nn.silu(self.norm1(embed_patches(self.conv1, images, self.dtype)))
        return self.norm2(self.conv2(x.astype(self.dtype)))

    @staticmethod
    def grid_len(size: int) -> int:
        """Tokens along an image side of ``size`` pixels."""
        return ((size + 2 - 9) // 8 + 2 - 3) // 2 + 1


class ViG(nnx.Module):
    """Plain ViG: stem (stride 16) -> + position embedding -> blocks of gated linear
    attention and SwiGLU -> RMSNorm -> mean over tokens -> head.

    Call on NHWC float images (batch, H, W, channels) of any size (the position embedding
    is resized as the official code does); returns logits (batch, num_classes) float32, or
    the pooled features (batch, embed_dim) with ``num_classes=0``. Starts in eval mode;
    ``model.train()`` turns on drop path and the training path's /2.

    act_in_conv, out_act: ViG-T's SiLU after the depthwise conv and before o_proj (ViG-S/B
    have neither; the weights cannot tell, the registry knows).
    """

    family = "vig"  # which official state-dict layout its weights follow

    def __init__(self, *, img_size: int = 224, in_chans: int = 3, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, num_classes: int = 1000,
                 act_in_conv: bool = True, out_act: bool = True, drop_path_rate: float = 0.0,
                 dtype=jnp.float32, gla_backend: str = "auto", remat: str = "none",
                 rngs: nnx.Rngs):
        if img_size < 16:
            raise ValueError(f"img_size={img_size} is smaller than the stem's stride 16")
        self.embed_dim, self.depth, self.num_classes, self.dtype = embed_dim, depth, num_classes, dtype
        check_remat(remat)
        self.in_chans, self.drop_path_rate, self.remat = in_chans, drop_path_rate, remat
        self.grid = (self.grid_len(img_size),) * 2
        self.deterministic = True
        self.portable = False
        self.rngs = nnx.Rngs(dropout=rngs.dropout()) if drop_path_rate > 0 else None
        self.patch_embed = PatchEmbed(in_chans, embed_dim, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(nnx.initializers.truncated_normal(0.02)(
            rngs.params(), (1, self.grid[0] * self.grid[1], embed_dim)))
        mixer_kw = dict(act_in_conv=act_in_conv, out_act=out_act, eval_halves=True,
                        gla_backend=gla_backend)
        self.blocks = nnx.List([Block(embed_dim, num_heads, mixer_kw=mixer_kw, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = RMSNorm(embed_dim, RMS_EPS)
        if num_classes:
            self.head = nnx.Linear(embed_dim, num_classes, kernel_init=nnx.initializers.normal(0.02),
                                   dtype=dtype, rngs=rngs)

    grid_len = staticmethod(PatchEmbed.grid_len)

    def embed(self, images):
        """(batch, H, W, C) -> (tokens (batch, gh*gw, D) float32 with positions added, (gh, gw))."""
        check_images(images, self.in_chans, 16)
        x = self.patch_embed(images)
        b, gh, gw, d = x.shape
        pos = resize_pos_embed(self.pos_embed[...], self.grid, (gh, gw))
        return x.reshape(b, gh * gw, d).astype(jnp.float32) + pos, (gh, gw)

    def _blocks(self, x, grid, collect: bool = False):
        deterministic = self.deterministic or self.drop_path_rate == 0
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        keys = (jax.random.split(self.rngs.dropout(), (self.depth, 2)) if not deterministic
                else [(None, None)] * self.depth)
        outs = []
        for blk, rate, key in zip(self.blocks, rates, keys):
            call = remat_block(lambda m, x, k: m(x, grid, rate, k, deterministic), self.remat)
            x = call(blk, x, key)
            outs.append(x)
        return x, outs

    def forward_features(self, images):
        """(batch, H, W, C) -> pooled features (batch, embed_dim) float32."""
        x, grid = self.embed(images)
        x, _ = self._blocks(x, grid)
        return self.norm(x).mean(axis=1)

    def forward_intermediates(self, images, layers: Sequence[int] = (2, 5, 8, 11), *,
                              norm: bool = False):
        """Feature maps for dense prediction: for each block index in ``layers`` (negative
        counts from the end) that block's output, (batch, gh, gw, embed_dim) float32; with
        ``norm``, then the final normed tokens as one more map."""
        bad = [i for i in layers if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {self.depth}-block model "
                             f"(allowed {-self.depth}..{self.depth - 1})")
        x, grid = self.embed(images)
        x, outs = self._blocks(x, grid, collect=True)
        as_map = lambda t: t.reshape(t.shape[0], *grid, -1)
        maps = [as_map(outs[i]) for i in layers]
        return maps + [as_map(self.norm(x))] if norm else maps

    def __call__(self, images):
        """(batch, H, W, C) -> logits (batch, num_classes) float32 (features if num_classes=0)."""
        features = self.forward_features(images)
        if not self.num_classes:
            return features
        return self.head(features.astype(self.dtype)).astype(jnp.float32)
