"""Semantic segmentation on either backbone family: UperNet and its FCN auxiliary head
(mmseg's ``UPerHead``, ``FCNHead``) on four feature maps at strides 4, 8, 16, 32.

Images NHWC (batch, H, W, 3) of any size divisible by the backbone's stride; logits NHWC
(batch, H, W, num_classes) float32, at the input size.

- ``VimUperNet`` (hustvl/Vim ``seg/``: ``backbone/vim.py``, ``configs/_base_/models/
  upernet_vim.py``): a Vim without class token or head (the official ``VisionMambaSeg`` drops
  both); the last block of each quarter of its depth (5, 11, 17, 23 of 24) gives one map at
  stride 16, which the official multi-scale neck turns into strides 4, 8, 16, 32.
- ``ViGHUperNet``: ViG-H's four normed stage outputs (the official ``Backbone_HierViG``)
  are already at strides 4, 8, 16, 32, one width each, and go to the head without a neck.

Normalisation layers in the neck and heads are BatchNorm (the official SyncBN: under jit on
a mesh the batch statistics are over the global batch).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vim_jax.models.vig_h import HierViG
from vim_jax.models.vim import VisionMamba

# mmseg's BatchNorm: eps 1e-5, running averages updated with torch momentum 0.1.
_BN = dict(epsilon=1e-5, momentum=0.9)


def resize_bilinear(x, size):
    """(batch, h, w, c) -> (batch, *size, c), PyTorch's bilinear with align_corners=False."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def adaptive_avg_pool(x, bins: int):
    """PyTorch's AdaptiveAvgPool2d(bins) on (batch, h, w, c): bin i spans
    [floor(i h / bins), ceil((i + 1) h / bins))."""
    h, w = x.shape[1:3]
    rows = [(i * h // bins, -(-(i + 1) * h // bins)) for i in range(bins)]
    cols = [(j * w // bins, -(-(j + 1) * w // bins)) for j in range(bins)]
    return jnp.stack([jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in cols], 1)
                      for r0, r1 in rows], 1)


def max_pool(x, k: int):
    return nnx.max_pool(x, (k, k), strides=(k, k))


class ConvModule(nnx.Module):
    """mmseg's ConvModule: conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding=kernel // 2, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, **_BN, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class MultiScaleNeck(nnx.Module):
    """One stride-16 (or stride-8) map per level -> strides 4, 8, 16, 32 (official fpn1..4)."""

    def __init__(self, dim: int, stride: int, *, rngs: nnx.Rngs):
        if stride not in (16, 8):
            raise ValueError(f"the segmentation neck takes a stride-16 or stride-8 backbone, not {stride}")
        self.stride = stride
        up = lambda: nnx.ConvTranspose(dim, dim, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
        if stride == 16:
            self.up4a, self.bn4, self.up4b = up(), nnx.BatchNorm(dim, **_BN, rngs=rngs), up()
        self.up8 = up()

    def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
        a, b, c, d = maps
        if self.stride == 16:
            return [self.up4b(jax.nn.gelu(self.bn4(self.up4a(a)), approximate=False)),
                    self.up8(b), c, max_pool(d, 2)]
        return [self.up8(a), b, max_pool(c, 2), max_pool(d, 4)]


class UperNetHead(nnx.Module):
    """UPerHead (Xiao et al. 2018, as mmseg): pyramid pooling on the coarsest level, FPN
    top-down fusion, 3x3 convs, all levels fused at stride 4, classifier.

    in_dims: the four levels' widths (finest first), or one width for all four.
    """

    def __init__(self, in_dims: int | Sequence[int], channels: int, num_classes: int, *,
                 pool_scales=(1, 2, 3, 6), dropout: float = 0.1, rngs: nnx.Rngs):
        dims = (in_dims,) * 4 if isinstance(in_dims, int) else tuple(in_dims)
        if len(dims) != 4:
            raise ValueError(f"in_dims={in_dims}: UperNet takes four levels (strides 4, 8, 16, 32)")
        self.pool_scales = tuple(pool_scales)
        self.ppm = nnx.List([ConvModule(dims[3], channels, 1, rngs=rngs) for _ in self.pool_scales])
        self.bottleneck = ConvModule(dims[3] + len(self.pool_scales) * channels, channels, 3, rngs=rngs)
        self.lateral = nnx.List([ConvModule(d, channels, 1, rngs=rngs) for d in dims[:3]])
        self.fpn = nnx.List([ConvModule(channels, channels, 3, rngs=rngs) for _ in range(3)])
        self.fuse = ConvModule(4 * channels, channels, 3, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

    def __call__(self, levels: Sequence[jax.Array]):
        top = levels[3]
        pooled = [resize_bilinear(m(adaptive_avg_pool(top, s)), top.shape[1:3])
                  for s, m in zip(self.pool_scales, self.ppm)]
        lat = [m(x) for m, x in zip(self.lateral, levels[:3])] + [self.bottleneck(jnp.concatenate([top] + pooled, -1))]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + resize_bilinear(lat[i], lat[i - 1].shape[1:3])
        outs = [m(x) for m, x in zip(self.fpn, lat[:3])] + [lat[3]]
        size = outs[0].shape[1:3]
        x = self.fuse(jnp.concatenate([resize_bilinear(o, size) for o in outs], -1))
        return self.classifier(self.dropout(x))


class FCNHead(nnx.Module):
    """The auxiliary head: 3x3 ConvModule -> dropout -> classifier (mmseg FCNHead, 1 conv)."""

    def __init__(self, cin: int, channels: int, num_classes: int, *, dropout: float = 0.1,
                 rngs: nnx.Rngs):
        self.conv = ConvModule(cin, channels, 3, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.classifier(self.dropout(self.conv(x)))


class UperNet(nnx.Module):
    """What both segmenters share: ``self.decode`` (UperNet) and ``self.aux`` (FCN, on the
    stride-16 level) on the four levels ``self._levels(images)`` gives.

    ``model(images)`` -> logits (batch, H, W, num_classes) float32 at the input size;
    ``model.logits_and_aux(images)`` -> (logits, auxiliary logits), both at the input size,
    for the training loss (the official weights: 1 and 0.4).
    """

    stride: int  # the input's height and width must be multiples of it

    def _levels(self, images) -> list[jax.Array]:
        raise NotImplementedError

    def _checked_levels(self, images):
        s = self.stride
        if images.ndim != 4 or images.shape[1] % s or images.shape[2] % s:
            raise ValueError(f"images must be NHWC with height and width multiples of the "
                             f"backbone stride {s}, got shape {tuple(images.shape)}")
        return self._levels(images)

    def logits_and_aux(self, images):
        levels = self._checked_levels(images)
        size = images.shape[1:3]
        return (resize_bilinear(self.decode(levels), size).astype(jnp.float32),
                resize_bilinear(self.aux(levels[2]), size).astype(jnp.float32))

    def __call__(self, images):
        return resize_bilinear(self.decode(self._checked_levels(images)),
                               images.shape[1:3]).astype(jnp.float32)


class VimUperNet(UperNet):
    """Vim backbone + multi-scale neck + UperNet head (+ FCN auxiliary head on level 3)."""

    def __init__(self, *, num_classes: int, img_size: int = 512, patch_size: int = 16,
                 stride: int | None = None, embed_dim: int = 192, depth: int = 24,
                 layers: Sequence[int] | None = None, channels: int = 192,
                 aux_channels: int = 256, drop_path_rate: float = 0.1, dtype=jnp.float32,
                 scan_backend: str = "auto", remat: str = "mixer", rngs: nnx.Rngs):
        # The last block of each quarter: 5, 11, 17, 23 of 24, as the official configs.
        layers = (tuple(layers) if layers is not None
                  else tuple(max(0, depth * (k + 1) // 4 - 1) for k in range(4)))
        if len(layers) != 4:
            raise ValueError(f"layers={layers}: the neck takes exactly 4 block indices")
        self.num_classes, self.layers = num_classes, tuple(layers)
        self.backbone = VisionMamba(img_size=img_size, patch_size=patch_size, stride=stride,
                                    embed_dim=embed_dim, depth=depth, num_classes=0,
                                    cls_position="none", drop_path_rate=drop_path_rate, dtype=dtype,
                                    scan_backend=scan_backend, remat=remat, rngs=rngs)
        self.stride = self.backbone.stride
        self.neck = MultiScaleNeck(embed_dim, self.backbone.stride, rngs=rngs)
        self.decode = UperNetHead(embed_dim, channels, num_classes, rngs=rngs)
        self.aux = FCNHead(embed_dim, aux_channels, num_classes, rngs=rngs)
        self.eval()  # BatchNorm on running statistics, no dropout, like the backbone; .train()

    def _levels(self, images):
        return self.neck(self.backbone.forward_intermediates(images, self.layers))


class ViGHUperNet(UperNet):
    """ViG-H backbone (its four normed stage outputs, widths dims[0..3]) + UperNet head
    (+ FCN auxiliary head on the stride-16 stage). Arguments as ``HierViG``'s, plus the
    heads' widths."""

    stride = 32

    def __init__(self, *, num_classes: int, img_size: int = 512, dims: int | Sequence[int] = 96,
                 depths: Sequence[int] = (2, 2, 5, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 channels: int = 512, aux_channels: int = 256, drop_path_rate: float = 0.2,
                 dtype=jnp.float32, gla_backend: str = "auto", remat: str = "mixer",
                 rngs: nnx.Rngs):
        if len(tuple(depths)) != 4:
            raise ValueError(f"depths={tuple(depths)}: UperNet takes ViG-H's four stages")
        self.num_classes = num_classes
        self.backbone = HierViG(img_size=img_size, dims=dims, depths=depths, num_heads=num_heads,
                                num_classes=0, drop_path_rate=drop_path_rate, dtype=dtype,
                                gla_backend=gla_backend, remat=remat, out_norms=True, rngs=rngs)
        widths = self.backbone.dims
        self.decode = UperNetHead(widths, channels, num_classes, rngs=rngs)
        self.aux = FCNHead(widths[2], aux_channels, num_classes, rngs=rngs)
        self.eval()

    def _levels(self, images):
        return self.backbone.forward_intermediates(images)
