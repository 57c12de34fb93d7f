"""Mixup / CutMix with label smoothing, on device (timm's Mixup, mode 'batch')."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    """(batch,) int -> (batch, num_classes) float32 targets with label smoothing."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(key, images, labels, *, num_classes: int, mixup: float, cutmix: float,
              switch_prob: float = 0.5, smoothing: float = 0.1):
    """Mixes a batch with its reverse: images (b, H, W, C), labels (b,) -> images, (b, classes).

    With both on, CutMix is chosen with ``switch_prob``; mixup lam ~ Beta(mixup, mixup), CutMix
    lam ~ Beta(cutmix, cutmix) then corrected to the box's true area. With both 0 only smoothing.
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 5)
    use_cut = (jax.random.uniform(k_switch) < switch_prob) if mixup > 0 and cutmix > 0 else cutmix > 0
    lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else 1.0
    lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else 1.0

    h, w = images.shape[1:3]
    ratio = jnp.sqrt(1.0 - lam_cut)
    ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

    flipped = images[::-1]
    cut_images = jnp.where(box[None, :, :, None], flipped, images)
    mix_images = lam_mix * images + (1.0 - lam_mix) * flipped
    lam = jnp.where(use_cut, lam_box, lam_mix).astype(jnp.float32)
    images = jnp.where(use_cut, cut_images, mix_images).astype(images.dtype)
    return images, lam * targets + (1.0 - lam) * targets[::-1]
