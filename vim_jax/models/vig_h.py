"""Hierarchical ViG (ViG-H, arXiv 2405.18425) in Flax NNX: four stages of gated linear
attention blocks at strides 4, 8, 16, 32, channels-last.

Stem Conv(k3, s2) -> LayerNorm -> GELU -> Conv(k3, s2) -> LayerNorm; each stage's blocks are
``x + drop_path(BiGLA(LN(x)))`` then ``x + drop_path(SwiGLU(LN(x)))``; a Conv(k3, s2) ->
LayerNorm between stages; LayerNorm -> average pool -> head. The token mixer is plain
ViG's (``vig.BiGLA``) without its SiLUs, and its eval path equals its training path.
The architecture and the official conventions: docs/vig.md.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vim_jax.models.vig import BiGLA, SwiGLU, _conv, check_remat, layer_norm, remat_block, swiglu_hidden
from vim_jax.models.vim import check_images, drop_path

_TRUNC = nnx.initializers.truncated_normal(0.02)  # the official init of every Linear


class Block(nnx.Module):
    """(batch, H, W, C) float32 -> the same: token mixer, then SwiGLU, each pre-normed."""

    def __init__(self, dim: int, num_heads: int, *, dtype, gla_backend: str, rngs: nnx.Rngs):
        self.norm = layer_norm(dim, rngs)
        self.op = BiGLA(dim, num_heads, act_in_conv=False, out_act=False, eval_halves=False,
                        linear_init=lambda _: _TRUNC, dtype=dtype, gla_backend=gla_backend,
                        rngs=rngs)
        self.norm2 = layer_norm(dim, rngs)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, 32), init=_TRUNC, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, rate, keys, deterministic):
        h = self.op(self.norm(x).astype(self.dtype)).reshape(x.shape)
        x = x + drop_path(h, rate, keys[0], deterministic).astype(jnp.float32)
        h = self.mlp(self.norm2(x).astype(self.dtype))
        return x + drop_path(h, rate, keys[1], deterministic).astype(jnp.float32)


class Stem(nnx.Module):
    """Stride 4: Conv(k3, s2, p1) -> LayerNorm -> GELU -> Conv(k3, s2, p1) -> LayerNorm."""

    def __init__(self, in_chans: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(in_chans, dim // 2, 3, 2, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim // 2, rngs)
        self.conv2 = _conv(dim // 2, dim, 3, 2, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs)
        self.dtype = dtype

    def __call__(self, images):
        x = jax.nn.gelu(self.norm1(self.conv1(images.astype(self.dtype))), approximate=False)
        return self.norm2(self.conv2(x.astype(self.dtype)))


class Downsample(nnx.Module):
    """Conv(k3, s2, p1) -> LayerNorm."""

    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, 3, 2, dtype=dtype, rngs=rngs)
        self.norm = layer_norm(cout, rngs)

    def __call__(self, x):
        return self.norm(self.conv(x.astype(self.conv.dtype)))


class Stage(nnx.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int | None, *, dtype,
                 gla_backend: str, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(dim, num_heads, dtype=dtype, gla_backend=gla_backend, rngs=rngs)
                                for _ in range(depth)])
        self.downsample = Downsample(dim, out_dim, dtype=dtype, rngs=rngs) if out_dim else None


class HierViG(nnx.Module):
    """ViG-H: (batch, H, W, C) float images of any size (H, W >= 32) -> logits (batch,
    num_classes) float32, or pooled features (batch, dims[-1]) with ``num_classes=0``.
    Starts in eval mode; ``model.train()`` turns on drop path.

    dims: the stage widths, or the first one (doubled per stage). out_norms: the official
    dense backbone (``Backbone_HierViG``): four LayerNorms on the stage outputs
    (``forward_intermediates`` returns them normed) in place of the classifier (final norm
    and head), so ``num_classes`` must be 0 and only ``forward_intermediates`` runs.
    Classification checkpoints hold no out norms.
    """

    family = "vig_h"  # which official state-dict layout its weights follow

    def __init__(self, *, img_size: int = 224, in_chans: int = 3, dims: int | Sequence[int] = 96,
                 depths: Sequence[int] = (2, 2, 5, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 num_classes: int = 1000, drop_path_rate: float = 0.0, dtype=jnp.float32,
                 gla_backend: str = "auto", remat: str = "none", out_norms: bool = False,
                 rngs: nnx.Rngs):
        depths = tuple(depths)
        dims = tuple(dims) if not isinstance(dims, int) else tuple(dims * 2 ** i for i in range(len(depths)))
        if not (len(dims) == len(depths) <= len(num_heads)):
            raise ValueError(f"dims {dims}, depths {depths} and num_heads {tuple(num_heads)}: need one "
                             "width and one depth per stage, and at least as many head counts")
        if out_norms and num_classes:
            raise ValueError(f"out_norms=True builds the dense backbone, which has no classifier: "
                             f"pass num_classes=0, not {num_classes}")
        if img_size < 32:
            raise ValueError(f"img_size={img_size} is smaller than ViG-H's total stride 32")
        self.dims, self.depths, self.num_classes, self.dtype = dims, depths, num_classes, dtype
        check_remat(remat)
        self.in_chans, self.drop_path_rate, self.remat = in_chans, drop_path_rate, remat
        self.deterministic = True
        self.portable = False
        self.rngs = nnx.Rngs(dropout=rngs.dropout()) if drop_path_rate > 0 else None
        self.stem = Stem(in_chans, dims[0], dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            Stage(dims[i], depths[i], num_heads[i], dims[i + 1] if i + 1 < len(dims) else None,
                  dtype=dtype, gla_backend=gla_backend, rngs=rngs)
            for i in range(len(dims))])
        self.outnorms = (nnx.List([layer_norm(d, rngs) for d in dims]) if out_norms else None)
        self.norm = None if out_norms else layer_norm(dims[-1], rngs)
        if num_classes:
            self.head = nnx.Linear(dims[-1], num_classes, kernel_init=_TRUNC, dtype=dtype, rngs=rngs)

    def _stages(self, images):
        """Images -> (the last stage's output, every stage's output before its downsample)."""
        check_images(images, self.in_chans, 32)
        deterministic = self.deterministic or self.drop_path_rate == 0
        rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))
        keys = (iter(jax.random.split(self.rngs.dropout(), (sum(self.depths), 2)))
                if not deterministic else None)
        x = self.stem(images).astype(jnp.float32)
        outs = []
        for stage in self.layers:
            for blk in stage.blocks:
                rate, key = next(rates), (next(keys) if keys is not None else (None, None))
                call = lambda m, x, k, rate=rate: m(x, rate, k, deterministic)
                x = remat_block(call, self.remat)(blk, x, key)
            outs.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x).astype(jnp.float32)
        return x, outs

    def forward_features(self, images):
        """(batch, H, W, C) -> pooled features (batch, dims[-1]) float32."""
        if self.norm is None:
            raise ValueError("this is ViG-H's dense backbone (out_norms=True), which has no final "
                             "norm or pooling: call forward_intermediates for its four stage outputs")
        x, _ = self._stages(images)
        return self.norm(x).mean(axis=(1, 2))

    def forward_intermediates(self, images):
        """The four stage outputs (before each downsample) at strides 4, 8, 16, 32, each
        (batch, h, w, dims[i]) float32; normed by ``outnorms`` when built with ``out_norms``,
        as the official dense backbone returns them."""
        _, outs = self._stages(images)
        if self.outnorms is None:
            return outs
        return [n(o) for n, o in zip(self.outnorms, outs)]

    def __call__(self, images):
        """(batch, H, W, C) -> logits (batch, num_classes) float32 (features if num_classes=0)."""
        features = self.forward_features(images)
        if not self.num_classes:
            return features
        return self.head(features.astype(self.dtype)).astype(jnp.float32)
