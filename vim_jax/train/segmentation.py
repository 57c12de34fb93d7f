"""What the semantic-segmentation task adds: per-pixel loss with an ignore label, confusion
matrices and the metrics read off them (mIoU, per-class IoU, pixel accuracy, as mmseg),
sliding-window inference (mmseg's ``slide`` mode), and label checks.

Shapes: images (batch, H, W, 3); logits (batch, H, W, num_classes) float32; labels
(batch, H, W) integers in 0..num_classes-1, or ``IGNORE`` for pixels that count nowhere.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
import optax

from vim_jax.data import IGNORE


def pixel_cross_entropy(logits, labels, ignore: int = IGNORE, *, avg_non_ignore: bool = False,
                        class_weight=None):
    """Cross-entropy summed over the pixels whose label is not ``ignore``, divided by all
    pixels (mmseg 0.29's default, which the official recipe uses: padding and ignored pixels
    dilute the loss) or, with ``avg_non_ignore``, by the non-ignored ones. ``class_weight``
    (num_classes,) scales each pixel's term by its label's weight, as mmseg's."""
    valid = labels != ignore
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    if class_weight is not None:
        ce = ce * jnp.asarray(class_weight, jnp.float32)[safe]
    total = jnp.sum(jnp.where(valid, ce, 0.0))
    return total / (jnp.maximum(jnp.sum(valid), 1) if avg_non_ignore else labels.size)


def confusion_matrix(pred, labels, num_classes: int, *, mask=None, ignore: int = IGNORE):
    """(num_classes, num_classes) int32 pixel counts, rows = ground truth, columns =
    prediction, over pixels with a label other than ``ignore`` (and ``mask`` != 0, per image
    (batch,) or per pixel). Sums over devices when the inputs are sharded (a jit reduction)."""
    valid = labels != ignore
    if mask is not None:
        valid &= jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - mask.ndim)) > 0
    k = num_classes
    idx = jnp.where(valid, labels.astype(jnp.int32) * k + pred.astype(jnp.int32), k * k)
    return jnp.bincount(idx.ravel(), length=k * k + 1)[:k * k].reshape(k, k).astype(jnp.int32)


def metrics_from_confusion(cm) -> dict:
    """mIoU, per-class IoU and accuracy, pixel accuracy (percent, as classification's top-1
    and as mmseg reports them) from a confusion matrix.
    A class absent from both the ground truth and the predictions has IoU None and is left
    out of the mean, as mmseg's nanmean."""
    cm = np.asarray(cm, np.float64)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = 100 * tp / (gt + pred - tp)
        acc = 100 * tp / gt
    # None (JSON null) where a class is absent: NaN is not JSON.
    listed = lambda a: [float(v) if np.isfinite(v) else None for v in a]  # noqa: E731
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else None,
            "pixel_acc": float(100 * tp.sum() / max(cm.sum(), 1.0)),
            "iou": listed(iou), "class_acc": listed(acc), "pixels": int(cm.sum())}


def windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's slide windows along one axis: (start, end) pairs covering 0..size."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def sliding_window_logits(logits_fn: Callable, images, *, crop: int, stride: int, num_classes: int):
    """mmseg ``slide`` inference: ``logits_fn`` on every crop x crop window (stride apart,
    the last one flush with the border), logits summed where windows overlap and divided by
    the number of windows covering each pixel. A window never exceeds the image."""
    if stride <= 0 or crop <= 0:
        raise ValueError(f"crop={crop} and stride={stride} must be positive")
    b, h, w = images.shape[:3]
    total = jnp.zeros((b, h, w, num_classes), jnp.float32)
    count = np.zeros((h, w), np.float32)
    for y0, y1 in windows(h, crop, stride):
        for x0, x1 in windows(w, crop, stride):
            out = logits_fn(images[:, y0:y1, x0:x1]).astype(jnp.float32)
            total = total.at[:, y0:y1, x0:x1].add(out)
            count[y0:y1, x0:x1] += 1
    return total / jnp.asarray(count)[None, :, :, None]


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """ValueError naming ``where`` and the first value outside 0..num_classes-1 and IGNORE."""
    labels = np.asarray(labels)
    bad = (labels >= num_classes) & (labels != IGNORE) | (labels < 0)
    if bad.any():
        raise ValueError(f"{where}: label {int(labels[bad].flat[0])} is outside 0..{num_classes - 1} "
                         f"and is not the ignore label {IGNORE}")
