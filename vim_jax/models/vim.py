"""Vision Mamba (Vim, arXiv 2401.09417) in Flax NNX.

Shapes: images are NHWC; the token sequence is (batch, M, embed_dim) with M the
number of patches plus the class tokens. The residual stream is float32 whatever
the compute dtype, as in the official ``residual_in_fp32=True``.

The 24 blocks are one stacked module applied with ``jax.lax.scan`` so that
compile time does not grow with depth.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vim_jax.mixers import ops
from vim_jax.mixers.selective_scan import selective_scan

CLS_POSITIONS = ("middle", "head", "double", "none")
REMAT = ("mixer", "full", "none")
# What a block keeps for its backward pass under remat="mixer": the matmul outputs, the
# scan outputs and the scan's residual (its chunk-entry states), so the backward never
# reruns a forward scan. The conv, SiLU, softplus and norms are recomputed.
_SAVED = ("in_proj", "x_proj", "scan", "out_proj", "scan_states")

# PyTorch's default Linear/Conv1d init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _rms_norm(x, weight, eps):
    """RMSNorm over the last axis in float32 (official ``rms_norm_ref``)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale; returns float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return _rms_norm(x, self.weight[...], self.eps)


def _dt_bias_init(key, shape, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] (official Mamba init)."""
    dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class BiMambaMixer(nnx.Module):
    """Bidirectional Mamba mixer ("bimamba v2", divide-out) on (batch, L, d_model)."""

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 depth: int = 24, dtype=jnp.float32, scan_backend: str = "auto", rngs: nnx.Rngs):
        d_inner = expand * d_model
        dt_rank = math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.dtype, self.scan_backend = dtype, scan_backend
        self.portable = False  # the export mode: see VisionMamba
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                         kernel_init=torch_default_init, rngs=rngs)
        self.in_proj = linear(d_model, 2 * d_inner)
        out_scale = 1.0 / math.sqrt(depth)  # official rescale_prenorm_residual
        self.out_proj = nnx.Linear(
            d_inner, d_model, use_bias=False, dtype=dtype, rngs=rngs,
            kernel_init=lambda k, s, d=jnp.float32: torch_default_init(k, s, d) * out_scale)
        a_log = jnp.log(jnp.tile(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, 1)))
        conv_bound = 1.0 / math.sqrt(d_conv)
        dt_bound = dt_rank ** -0.5
        # One set of SSM parameters per direction: no suffix forward, "_b" backward (the
        # official names).
        for suffix in ("", "_b"):
            setattr(self, "conv_weight" + suffix, nnx.Param(jax.random.uniform(
                rngs.params(), (d_conv, d_inner), minval=-conv_bound, maxval=conv_bound)))
            setattr(self, "conv_bias" + suffix, nnx.Param(jax.random.uniform(
                rngs.params(), (d_inner,), minval=-conv_bound, maxval=conv_bound)))
            setattr(self, "x_proj" + suffix, linear(d_inner, dt_rank + 2 * d_state))
            setattr(self, "dt_proj" + suffix, nnx.Linear(
                dt_rank, d_inner, dtype=dtype, rngs=rngs,
                kernel_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -dt_bound, dt_bound),
                bias_init=lambda k, s, d=jnp.float32: _dt_bias_init(k, s).astype(d)))
            setattr(self, "A_log" + suffix, nnx.Param(a_log))
            setattr(self, "D" + suffix, nnx.Param(jnp.ones((d_inner,), jnp.float32)))

    def _direction(self, x, z, suffix: str, reverse: bool):
        conv_w = getattr(self, "conv_weight" + suffix)[...].astype(self.dtype)
        conv_b = getattr(self, "conv_bias" + suffix)[...].astype(self.dtype)
        xc = ops.silu(ops.depthwise_conv(x, conv_w, conv_b, anti_causal=reverse), portable=self.portable)
        x_proj = getattr(self, "x_proj" + suffix).kernel[...].astype(self.dtype)
        x_dbl = checkpoint_name(self._dense(xc, x_proj), "x_proj")
        dt_in, b, c = jnp.split(x_dbl, [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        dt_proj = getattr(self, "dt_proj" + suffix)
        delta = self._dense(dt_in, dt_proj.kernel[...].astype(self.dtype))  # bias goes into the scan
        # A, softplus(dt + bias), the decay exp(dt * A) and the state stay float32 in every
        # compute dtype (the scan casts; so do the norms and the residual): dt * A is often
        # ~1e-3, and bfloat16's spacing below 1 is 2^-9, so a bfloat16 decay would round to
        # exactly 1 and the state would never forget.
        a = -jnp.exp(getattr(self, "A_log" + suffix)[...].astype(jnp.float32))
        y = selective_scan(
            xc, delta, a, b, c, getattr(self, "D" + suffix)[...], z,
            dt_proj.bias[...], delta_softplus=True, reverse=reverse,
            backend="portable" if self.portable else self.scan_backend)
        return checkpoint_name(y, "scan")

    def _dense(self, x, w):
        return ops.dense(x, w, portable=self.portable)

    def __call__(self, hidden):
        # Two matmuls on the kernel's halves rather than one split of the activation: the
        # strided halves of a (.., 2*d_inner) array slow every kernel that reads them.
        h = hidden.astype(self.dtype)
        w = self.in_proj.kernel[...].astype(self.dtype)
        x = checkpoint_name(self._dense(h, w[:, :self.d_inner]), "in_proj")
        z = checkpoint_name(self._dense(h, w[:, self.d_inner:]), "in_proj")
        y = self._direction(x, z, "", reverse=False) + self._direction(x, z, "_b", reverse=True)
        out_w = self.out_proj.kernel[...].astype(self.dtype)
        return checkpoint_name(self._dense(y / 2, out_w), "out_proj")


class Block(nnx.Module):
    """hidden = Mixer(RMSNorm(residual)); the residual add happens in the caller."""

    def __init__(self, d_model: int, *, norm_eps: float = 1e-5, rngs: nnx.Rngs, **mixer_kw):
        self.norm = RMSNorm(d_model, norm_eps)
        self.mixer = BiMambaMixer(d_model, rngs=rngs, **mixer_kw)

    def __call__(self, residual):
        return self.mixer(self.norm(residual))


def drop_path(x, rate, key, deterministic: bool):
    """Stochastic depth per sample; ``rate`` may be a traced scalar."""
    if deterministic or key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0).astype(x.dtype)


def resample_patch_pos_embed(pos, old_grid, new_grid):
    """Bicubic resize of patch position embeddings (1, gh*gw, d) -> (1, nh*nw, d)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(old_grid[0], old_grid[1], d)
    out = jax.image.resize(grid.astype(jnp.float32), (new_grid[0], new_grid[1], d),
                           method="bicubic", antialias=False)
    return out.reshape(1, new_grid[0] * new_grid[1], d).astype(pos.dtype)


def class_token_indices(cls_position: str, num_patches: int):
    """Indices of the class tokens in the token sequence (empty for 'none')."""
    return {"middle": (num_patches // 2,), "head": (0,), "double": (0, num_patches + 1),
            "none": ()}[cls_position]


def split_pos_embed(pos, cls_position: str, num_patches: int):
    """(1, M, d) -> (patch part (1, num_patches, d), class parts (1, k, d))."""
    idx = class_token_indices(cls_position, num_patches)
    keep = [i for i in range(pos.shape[1]) if i not in idx]
    return pos[:, jnp.array(keep)], pos[:, jnp.array(idx, dtype=jnp.int32)]


def join_pos_embed(patch, cls, cls_position: str):
    """Inverse of ``split_pos_embed``: class entries back at their positions."""
    m = patch.shape[1]
    if cls_position == "middle":
        return jnp.concatenate([patch[:, :m // 2], cls, patch[:, m // 2:]], axis=1)
    if cls_position == "head":
        return jnp.concatenate([cls, patch], axis=1)
    if cls_position == "double":
        return jnp.concatenate([cls[:, :1], patch, cls[:, 1:]], axis=1)
    return patch


def resize_pos_embed(pos, cls_position: str, old_grid, new_grid):
    """(1, M, d) position embedding for ``old_grid`` -> the same for ``new_grid``.

    The patch part is resized bicubically; class-token entries are kept as they are and
    put back at their positions for the new patch count.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    patch, cls = split_pos_embed(pos, cls_position, old_grid[0] * old_grid[1])
    return join_pos_embed(resample_patch_pos_embed(patch, old_grid, new_grid), cls, cls_position)


# About how many elements of each image one band of patch rows cuts (see embed_patches): on
# a TPU the cut rows are laid out with a block's s columns as the minor axis, padded to 128
# lanes, so in bfloat16 a band costs up to 2 x 128 / s bytes an element, 32 MiB an image for
# ViG's s = 8. Images up to about this size (3 x 590 x 590) are cut at once: a training step at
# 224-512 px has larger buffers live than the cut (in bands of 4 rows ViG-B's at 128 images
# a chip needed 15.83-15.88 GiB on v5e, not 15.71: more than the chip's 15.75), the
# high-resolution forward does not.
BAND_ELEMENTS = 1 << 20


def embed_patches(conv: nnx.Conv, images, dtype, band_elements: int = BAND_ELEMENTS):
    """``conv(images.astype(dtype))``, (batch, H, W, C) -> (batch, H', W', dim) in ``dtype``,
    for a convolution on raw images with stride s and a square kernel.

    XLA's TPU convolution makes a ``dtype`` copy of the images with C = 3 as the minor axis,
    padded to many lanes (1.49 of Vim-Ti's 1.67 GiB at 1248 px, batch 8, bfloat16, on v5e),
    and so does any pad or slice of them. So the images are cut into s x s blocks by a
    reshape, s * s * C channels each, and projected: non-overlapping patches (k = s, no
    padding: Vim, DeiT) by one matrix product, the convolution's own sums; others by a
    T x T convolution over the blocks (ViG's k9 s8 p1 stem: T = 2), its kernel the k x k
    one placed in a T s x T s square of zeros, the image's padding done on the block grid.
    The cutting itself is a TPU transpose with a block's s columns as the minor axis,
    padded to 128 lanes (16 times ViG-T's images at s = 8: 1.14 of its 1.48 GiB at 1248 px),
    so it runs in bands of output rows, each cutting about ``band_elements`` of each image
    (at least 4 (T - 1) rows; one band for images up to about that size; ViG-T's forward
    there: 0.57 GiB).
    Dilated, grouped, masked or "SAME"-padded convolutions run as they are."""
    from flax.linen.linear import canonicalize_padding

    k = conv.kernel_size[0]
    s = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)
    pad = canonicalize_padding(conv.padding, 2)  # "VALID", 1, (1, 2), ((1, 1), (2, 2)), ...
    pad = ((0, 0), (0, 0)) if pad == "VALID" else pad
    one = (None, 1, (1, 1))
    if (s[0] != s[1] or conv.kernel_size != (k, k) or isinstance(pad, str) or conv.kernel_dilation not in one
            or conv.input_dilation not in one or conv.feature_group_count != 1 or conv.mask is not None):
        return conv(images.astype(dtype))
    s = s[0]
    b, h, w, c = images.shape
    (top, bottom), (left, right) = pad
    out = ((h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1)
    # Output i reads the image's rows [s i - top, s i - top + k): blocks i - lo to i - lo + T - 1.
    lo = (-(-top // s), -(-left // s))
    taps = max(lo[0] + -(-(k - top) // s), lo[1] + -(-(k - left) // s))
    lo_h, lo_w = lo
    blocks = (out[0] - lo_h + taps - 1, out[1] - lo_w + taps - 1)  # the last output's last block + 1
    # Only rows and columns some output reads: zeros past the image (its bottom and right
    # padding), a crop of what none reads; nothing to do when the size is a multiple of s.
    x = images
    if (blocks[0] * s, blocks[1] * s) != (h, w):
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (0, blocks[0] * s - h, 0),
                                                     (0, blocks[1] * s - w, 0), (0, 0, 0)))
    kernel = conv.kernel[...].astype(dtype)  # (kh, kw, C, dim)
    dot = taps == 1 and (top, left) == (0, 0) and k == s
    if dot:
        kernel = kernel.reshape(s * s * c, -1)
    else:
        size = taps * s  # the kernel's first row sits at row lo * s - top of its window
        kernel = jnp.pad(kernel, ((lo_h * s - top, size - k - lo_h * s + top),
                                  (lo_w * s - left, size - k - lo_w * s + left), (0, 0), (0, 0)))
        kernel = kernel.reshape(taps, s, taps, s, c, -1).transpose(0, 2, 1, 3, 4, 5)
        kernel = kernel.reshape(taps, taps, s * s * c, -1)

    def rows(start, stop, first=None):
        """Output rows [start, stop): block rows [start - lo_h, stop - lo_h + T - 1), the ones
        above the image (start < lo_h) as padding; ``first`` (traced) replaces ``start`` as
        where the band's image rows begin."""
        above = max(lo_h - start, 0)
        n = stop - start + taps - 1 - above
        band = (x[:, (start - lo_h + above) * s:(start - lo_h + above + n) * s] if first is None
                else jax.lax.dynamic_slice_in_dim(x, (first - lo_h) * s, n * s, axis=1))
        band = band.reshape(b, n, s, blocks[1], s, c).transpose(0, 1, 3, 2, 4, 5)
        band = band.reshape(b, n, blocks[1], s * s * c).astype(dtype)
        if dot:
            return jnp.dot(band, kernel)
        return jax.lax.conv_general_dilated(band, kernel, (1, 1), ((above, 0), (lo_w, 0)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # Output rows a band makes: at least 4 (T - 1), so that the T - 1 block rows two bands
    # both read are at most a fifth of what they cut, and at least the lo_h rows of padding
    # above (only the first band has any).
    r = max(band_elements // (s * blocks[1] * s * c) - (taps - 1), 4 * (taps - 1), lo_h, 1)
    if r >= out[0]:
        y = rows(0, out[0])
    else:
        # The first band (padding above) and a last shorter one are traced as they are; the
        # ones between are one loop body, each reading its rows at a traced offset.
        full = out[0] // r
        parts = [rows(0, r)]
        if full > 1:
            mid = jax.lax.map(lambda j: rows(r, 2 * r, first=j * r), jnp.arange(1, full))
            parts.append(jnp.moveaxis(mid, 0, 1).reshape(b, (full - 1) * r, *mid.shape[3:]))
        if full * r < out[0]:
            parts.append(rows(full * r, out[0]))
        y = jnp.concatenate(parts, axis=1)
    return y + conv.bias[...].astype(dtype) if conv.bias is not None else y


def check_images(images, channels: int, min_size: int) -> None:
    """Raises ValueError naming the expected and the given shape (or dtype) unless
    ``images`` is a non-empty float NHWC batch (batch, H, W, channels), H and W >= min_size."""
    shape = tuple(images.shape)
    want = f"(batch, H, W, {channels}) float images, H and W >= {min_size}"
    if len(shape) == 3 and shape[-1] == channels:
        raise ValueError(f"images must be a batch {want}; got one image of shape {shape}: add a "
                         "batch axis (images[None])")
    if len(shape) != 4:
        raise ValueError(f"images must be NHWC {want}; got shape {shape}")
    if shape[-1] != channels:
        hint = ("; it looks like NCHW: pass images.transpose(0, 2, 3, 1)"
                if shape[1] == channels else "")
        raise ValueError(f"images must be NHWC {want}; got shape {shape} ({shape[-1]} channels){hint}")
    if shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch {want}; got shape {shape}")
    if min(shape[1:3]) < min_size:
        raise ValueError(f"image size {shape[1:3]} is smaller than the patch size {min_size}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float (the model expects normalised values: pixel/255 "
                         f"minus the mean, divided by the std, as vim_jax.predict.load_image makes "
                         f"them); got dtype {images.dtype}: for 0-255 {images.dtype} pixels, "
                         f"normalise first")


class VisionMamba(nnx.Module):
    """Vision Mamba: patch embed -> class token(s) -> pos embed -> Mamba blocks -> norm -> head.

    Call on NHWC float32 images (batch, H, W, channels) of any size (the position
    embedding is resized bicubically when the patch grid differs); returns logits
    (batch, num_classes). Starts in eval mode; ``model.train()`` turns on drop path.

    remat: what each block stores for the backward pass. "mixer" (default, as the paper):
    the matmul and scan outputs and the scan's chunk-entry states (so that no forward
    scan reruns), recomputing the conv, activations and norms; "full": nothing (recompute the block); "none": everything.

    Export mode: ``model.set_attributes(portable=True)`` traces the model into standard
    operations only (no per-platform choice, no CPU tricks, no reverse scan: the
    ``"portable"`` selective scan) for converters such as jax2onnx; the numbers are the
    same, the speed is not (``vim_jax.export`` sets it while exporting to ONNX).
    """

    family = "vim"  # which official state-dict layout its weights follow

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, stride: Optional[int] = None,
                 in_chans: int = 3, embed_dim: int = 192, depth: int = 24, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, num_classes: int = 1000,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-5, cls_position: str = "middle",
                 dtype=jnp.float32, scan_backend: str = "auto", remat: str = "mixer",
                 rngs: nnx.Rngs):
        if remat not in REMAT:
            raise ValueError(f"remat={remat!r} is not one of {REMAT}")
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position={cls_position!r} is not one of {CLS_POSITIONS}")
        stride = stride or patch_size
        if img_size < patch_size:
            raise ValueError(f"img_size={img_size} is smaller than patch_size={patch_size}")
        self.patch_size, self.stride, self.embed_dim, self.depth = patch_size, stride, embed_dim, depth
        self.num_classes, self.cls_position, self.dtype, self.remat = num_classes, cls_position, dtype, remat
        self.grid = (self.grid_len(img_size),) * 2
        self.num_cls_tokens = len(class_token_indices(cls_position, 0))
        self.drop_path_rate = drop_path_rate
        self.deterministic = True
        self.portable = False
        # Drop path draws from its own stream, so the parameter init stays the same.
        self.rngs = nnx.Rngs(dropout=rngs.dropout()) if drop_path_rate > 0 else None

        self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), strides=stride,
                                    padding="VALID", dtype=dtype,
                                    kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
        trunc = nnx.initializers.truncated_normal(0.02)
        num_patches = self.grid[0] * self.grid[1]
        if self.num_cls_tokens:
            self.cls_token = nnx.Param(trunc(rngs.params(), (1, self.num_cls_tokens, embed_dim)))
        self.pos_embed = nnx.Param(trunc(rngs.params(), (1, num_patches + self.num_cls_tokens, embed_dim)))

        mixer_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, depth=depth, dtype=dtype,
                        scan_backend=scan_backend)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(embed_dim, norm_eps=norm_eps, rngs=rngs, **mixer_kw)

        self.layers = make_layers(rngs)
        self.norm_f = RMSNorm(embed_dim, norm_eps)
        if num_classes:  # num_classes=0: no head, the model returns pooled features (timm's habit)
            self.head = nnx.Linear(embed_dim, num_classes, dtype=dtype, kernel_init=trunc, rngs=rngs)

    def grid_len(self, size: int) -> int:
        """Patches along an image side of ``size`` pixels."""
        return (size - self.patch_size) // self.stride + 1

    def layer(self, i: int) -> Block:
        """The i-th block as a standalone module (a view on a slice of the stacked params)."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

    def embed(self, images):
        """(batch, H, W, C) -> residual stream entering layer 0, (batch, M, embed_dim) float32."""
        check_images(images, self.patch_embed.in_features, self.patch_size)
        x = embed_patches(self.patch_embed, images, self.dtype)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        pos = resize_pos_embed(self.pos_embed[...], self.cls_position, self.grid, (gh, gw))
        if self.num_cls_tokens:
            cls = jnp.broadcast_to(self.cls_token[...], (b,) + self.cls_token.shape[1:])
            x = join_pos_embed(x, cls, self.cls_position)
        return x + pos

    def _blocks(self, x, collect: bool = False):
        """Residual stream entering layer 0 (batch, M, D) -> (residual, hidden) after the last
        block, and with ``collect`` every block's hidden output (depth, batch, M, D)."""
        deterministic = self.deterministic or self.drop_path_rate == 0
        # Official rates: block i drops its incoming hidden with inter_dpr[i], the final
        # add with drop_path_rate; inter_dpr = [0] + linspace(0, rate, depth).
        rates = jnp.concatenate([jnp.zeros((1,)), jnp.linspace(0.0, self.drop_path_rate, self.depth)[:-1]])
        keys = None if deterministic else jax.random.split(self.rngs.dropout(), self.depth + 1)

        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            residual, hidden = carry
            i, key = xs
            layer_state, rate = ops.select_layer((state, rates), i, portable=self.portable)
            residual = residual + drop_path(hidden, rate, key, deterministic).astype(jnp.float32)
            hidden = nnx.merge(graphdef, layer_state)(residual).astype(self.dtype)
            return (residual, hidden), (hidden if collect else None)

        # Only matters under differentiation: what the backward pass keeps per block.
        if self.remat == "mixer":
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=jax.checkpoint_policies.save_only_these_names(*_SAVED))
        elif self.remat == "full":
            body = jax.checkpoint(body, prevent_cse=False)
        layer_keys = None if keys is None else keys[:-1]
        # Layer 0 adds a zero hidden to residual = embeddings: exactly the official
        # residual = hidden for the first block, with the carry in the compute dtype.
        carry = (x, jnp.zeros(x.shape, self.dtype))
        (residual, hidden), hiddens = jax.lax.scan(body, carry, (jnp.arange(self.depth), layer_keys))
        final_key = None if keys is None else keys[-1]
        residual = residual + drop_path(hidden, self.drop_path_rate, final_key, deterministic).astype(jnp.float32)
        return self.norm_f(residual), hiddens

    def forward_features(self, images):
        """(batch, H, W, C) -> pooled features (batch, embed_dim) float32."""
        x, _ = self._blocks(self.embed(images))
        idx = class_token_indices(self.cls_position, x.shape[1] - self.num_cls_tokens)
        if not idx:
            return x.mean(axis=1)
        return sum(x[:, i] for i in idx) / len(idx)

    def forward_intermediates(self, images, layers=(5, 11, 17, 23), *, norm: bool = False):
        """Feature maps for dense prediction: (batch, H, W, C) images -> a list with, for each
        block index in ``layers`` (negative counts from the end), that block's output tokens
        (its mixer's output, as the official segmentation backbone takes them) without the
        class token(s), as a (batch, gh, gw, embed_dim) float32 map; with ``norm``, then the
        final normed residual stream as one more map. gh, gw is the patch grid of the input
        (any size; the position embedding is resized)."""
        bad = [i for i in layers if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {self.depth}-block model "
                             f"(allowed {-self.depth}..{self.depth - 1})")
        b, h, w = images.shape[:3]
        gh, gw = self.grid_len(h), self.grid_len(w)
        final, hiddens = self._blocks(self.embed(images), collect=True)

        def as_map(tokens):
            patches, _ = split_pos_embed(tokens, self.cls_position, gh * gw)
            return patches.reshape(b, gh, gw, -1).astype(jnp.float32)

        maps = [as_map(hiddens[i]) for i in layers]
        return maps + [as_map(final)] if norm else maps

    def __call__(self, images):
        """(batch, H, W, C) -> logits (batch, num_classes) float32, or the pooled features
        (batch, embed_dim) for a model built with num_classes=0."""
        features = self.forward_features(images)
        if not self.num_classes:
            return features
        return self.head(features.astype(self.dtype)).astype(jnp.float32)
