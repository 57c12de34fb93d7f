"""DeiT (a plain ViT with a class token) in Flax NNX: the baseline of Vim's efficiency claims.

Same conventions as ``vim.py``: NHWC images of any size (the patch position embedding is
resized bicubically), blocks stacked and run with ``jax.lax.scan``, ``forward_features``
returns the class-token features. Attention is ``jax.nn.dot_product_attention``, which
uses cuDNN's fused flash attention on a GPU (bf16/fp16) and XLA elsewhere, so the
comparison is against a strong baseline.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from vim_jax.models.vim import check_images, embed_patches, resize_pos_embed


class Block(nnx.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, dtype, attention: Optional[str],
                 rngs: nnx.Rngs):
        trunc = nnx.initializers.truncated_normal(0.02)
        dense = lambda i, o: nnx.Linear(i, o, dtype=dtype, kernel_init=trunc, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.qkv = dense(dim, 3 * dim)
        self.proj = dense(dim, dim)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.fc1 = dense(dim, int(dim * mlp_ratio))
        self.fc2 = dense(int(dim * mlp_ratio), dim)
        self.heads, self.attention = heads, attention

    def __call__(self, x):
        b, m, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, m, 3, self.heads, d // self.heads)
        att = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                           implementation=self.attention)
        x = x + self.proj(att.reshape(b, m, d)).astype(x.dtype)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)).astype(x.dtype)


class DeiT(nnx.Module):
    """DeiT / ViT classifier: (batch, H, W, C) images -> (batch, num_classes) logits."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, dtype=jnp.float32, attention: Optional[str] = None,
                 rngs: nnx.Rngs):
        self.patch_size, self.embed_dim, self.depth, self.dtype = patch_size, embed_dim, depth, dtype
        self.num_classes = num_classes
        self.grid = (img_size // patch_size,) * 2
        trunc = nnx.initializers.truncated_normal(0.02)
        self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), strides=patch_size,
                                    padding="VALID", dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(trunc(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = nnx.Param(trunc(rngs.params(), (1, self.grid[0] * self.grid[1] + 1, embed_dim)))

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(embed_dim, num_heads, mlp_ratio, dtype=dtype, attention=attention, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.LayerNorm(embed_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(embed_dim, num_classes, dtype=dtype, kernel_init=trunc, rngs=rngs)

    def forward_features(self, images):
        """(batch, H, W, C) -> class-token features (batch, embed_dim)."""
        check_images(images, self.patch_embed.in_features, self.patch_embed.kernel_size[0])
        x = embed_patches(self.patch_embed, images, self.dtype)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        pos = resize_pos_embed(self.pos_embed[...], "head", self.grid, (gh, gw))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        graphdef, state = nnx.split(self.blocks)
        x, _ = jax.lax.scan(lambda x, s: (nnx.merge(graphdef, s)(x), None), x, state)
        return self.norm(x)[:, 0]

    def __call__(self, images):
        return self.head(self.forward_features(images)).astype(jnp.float32)


DEIT_VARIANTS = {
    "deit_tiny_patch16_224": dict(embed_dim=192, num_heads=3),
    "deit_small_patch16_224": dict(embed_dim=384, num_heads=6),
    "deit_base_patch16_224": dict(embed_dim=768, num_heads=12),
}


def create_deit(name: str, *, seed: int = 0, **overrides) -> DeiT:
    """A DeiT variant from ``DEIT_VARIANTS`` (randomly initialised; for benchmarks)."""
    if name not in DEIT_VARIANTS:
        raise ValueError(f"unknown DeiT model {name!r}; known: {', '.join(DEIT_VARIANTS)}")
    kwargs = {**DEIT_VARIANTS[name], **overrides}
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return DeiT(**kwargs, rngs=nnx.Rngs(seed))
