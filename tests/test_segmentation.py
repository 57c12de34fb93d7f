"""The segmentation task's loss, metrics, sliding-window inference and label checks, against
NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.train.segmentation import (IGNORE, check_labels, confusion_matrix, metrics_from_confusion,
                                  pixel_cross_entropy, sliding_window_logits, windows)


def _labels(rng, shape, k, ignored=0.2):
    labels = rng.integers(0, k, shape)
    labels[rng.random(shape) < ignored] = IGNORE
    return labels


def test_loss_ignores_255_and_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
    labels = _labels(rng, (2, 6, 5), 4)
    valid = labels != IGNORE
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    got = float(pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(ce[valid].sum() / labels.size, rel=1e-5)  # mmseg 0.29: all pixels
    mean_valid = float(pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=True))
    assert mean_valid == pytest.approx(ce[valid].mean(), rel=1e-5)
    # Whatever the model says at ignored pixels changes nothing.
    other = np.where(valid[..., None], logits, 100 * rng.normal(size=logits.shape)).astype(np.float32)
    assert float(pixel_cross_entropy(jnp.asarray(other), jnp.asarray(labels))) == pytest.approx(got, rel=1e-6)
    assert float(pixel_cross_entropy(jnp.asarray(logits), jnp.full((2, 6, 5), IGNORE))) == 0.0


def test_confusion_matrix_and_miou_against_numpy():
    rng = np.random.default_rng(1)
    k = 5
    labels = _labels(rng, (3, 8, 7), k)
    pred = rng.integers(0, k, (3, 8, 7))
    pred[labels == 2] = 2           # class 2 perfectly found...
    pred[pred == 4] = 0             # ...class 4 never predicted
    labels[labels == 3] = 1         # class 3 absent from the ground truth
    pred[pred == 3] = 1             # and from the predictions: IoU NaN, left out of the mean
    mask = np.array([1.0, 1.0, 0.0])  # the third image is padding
    cm = np.asarray(confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), k, mask=jnp.asarray(mask)))
    want = np.zeros((k, k), np.int64)
    for t, p in zip(labels[:2].ravel(), pred[:2].ravel()):
        if t != IGNORE:
            want[t, p] += 1
    np.testing.assert_array_equal(cm, want)
    m = metrics_from_confusion(cm)
    iou = [want[c, c] / (want[c].sum() + want[:, c].sum() - want[c, c]) if want[c].sum() + want[:, c].sum()
           else np.nan for c in range(k)]
    assert m["iou"][3] is None and m["iou"][4] == 0.0  # None: JSON null
    assert m["miou"] == pytest.approx(100 * np.nanmean(iou))  # percent, as top-1
    assert m["pixel_acc"] == pytest.approx(100 * np.trace(want) / want.sum())
    assert m["pixels"] == int((labels[:2] != IGNORE).sum())


def test_windows_follow_mmseg():
    assert windows(512, 512, 341) == [(0, 512)]
    assert windows(700, 512, 341) == [(0, 512), (188, 700)]
    assert windows(1100, 512, 341) == [(0, 512), (341, 853), (588, 1100)]
    assert windows(300, 512, 341) == [(0, 300)]  # smaller than a window: the image itself


def test_sliding_window_equals_whole_image_inference():
    """A window covering the image is whole-image inference. For a per-pixel model (no
    context) every window agrees, so overlapping windows average to the whole-image logits:
    this checks placement and the overlap count."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
    per_pixel = lambda x: jnp.tanh(x @ w)
    images = jnp.asarray(rng.normal(size=(2, 40, 56, 3)).astype(np.float32))
    whole = per_pixel(images)
    for crop, stride in ((64, 48), (16, 11), (24, 24)):
        got = sliding_window_logits(per_pixel, images, crop=crop, stride=stride, num_classes=4)
        np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-6, atol=1e-6)
    # A model with context: one covering window is exactly the model on the image.
    context = lambda x: per_pixel(x) + x.mean(axis=(1, 2), keepdims=True)[..., :1]
    got = sliding_window_logits(context, images, crop=64, stride=48, num_classes=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(context(images)))
    split = sliding_window_logits(context, images, crop=32, stride=24, num_classes=4)
    assert not np.allclose(np.asarray(split), np.asarray(context(images)))  # context differs


def test_bad_labels_are_named():
    check_labels(np.array([[0, 3, IGNORE]]), 4, "a.png")
    with pytest.raises(ValueError, match=r"ann/7\.png: label 9 is outside 0\.\.3 and is not the ignore label 255"):
        check_labels(np.array([[0, 9, IGNORE, 12]]), 4, "ann/7.png")
