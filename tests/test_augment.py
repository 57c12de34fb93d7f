"""Augmentation values: evaluation geometry, random erasing's distribution, RandAugment's
pixel ops against PIL (timm's implementation), repeated augmentation. (Determinism and
resumption of the streams: test_data.py.)"""

import io
import math

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from conftest import tiny_config, write_image_folder  # noqa: E402
from vim_jax.data import augment  # noqa: E402
from vim_jax.data.pipeline import train_batches  # noqa: E402
from vim_jax.data.sources import make_source  # noqa: E402
from vim_jax.data.tf_setup import tf  # noqa: E402


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("h,w", [(40, 60), (75, 50)])
def test_eval_transform_resizes_the_short_side_and_crops_the_centre(h, w):
    """Rows and columns carry linear ramps, which bicubic resizing reproduces exactly away
    from the border, so each output pixel says which source coordinate it came from."""
    size, ratio = 16, 0.8                      # resize short side to floor(16 / 0.8) = 20
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.stack([rows * 3, cols * 3, np.full((h, w), 128.0)], -1).astype(np.uint8)
    cfg = tiny_config("unused").data
    cfg.image_size, cfg.eval_crop_ratio, cfg.mean, cfg.std = size, ratio, (0.0,) * 3, (1.0,) * 3
    out, valid = augment.eval_transform(tf.constant(_png(image)), cfg)
    out = out.numpy() * 255
    assert bool(valid) and out.shape == (size, size, 3)

    scale = 20 / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    top, left = (nh - size) // 2, (nw - size) // 2
    # Output pixel i is resized pixel top + i, whose centre maps to source (i + top + .5) / scale - .5.
    src_r = (np.arange(size) + top + 0.5) * h / nh - 0.5
    src_c = (np.arange(size) + left + 0.5) * w / nw - 0.5
    inner = slice(2, size - 2)  # the antialiasing kernel reaches the image border outside this
    np.testing.assert_allclose(out[inner, inner, 0], np.broadcast_to(3 * src_r[inner, None], (12, 12)), atol=1.0)
    np.testing.assert_allclose(out[inner, inner, 1], np.broadcast_to(3 * src_c[None, inner], (12, 12)), atol=1.0)
    np.testing.assert_allclose(out[..., 2], 128, atol=0.5)


def _erasing_reference(rng, h, w, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """timm RandomErasing's box (first of 10 tries that fits), in NumPy: its area fraction."""
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if eh < h and ew < w:
            return eh * ew / (h * w)
    return 0.0


def test_random_erasing_box_area_probability_and_noise():
    """Over 300 seeds: how often it erases (prob 0.4), that it erases one rectangle, that the
    rectangle's area fraction follows timm's distribution (mean within 4 standard errors of
    a NumPy reference of the same algorithm), and that the fill is N(0, 1)."""
    h = w = 24
    n, prob = 300, 0.4
    image = tf.fill((h, w, 3), 7.0)  # no N(0, 1) draw equals 7 exactly
    f = tf.function(lambda s: augment.random_erasing(image, s, prob))
    areas, fills = [], []
    for i in range(n):
        out = f(tf.constant([11, i], tf.int64)).numpy()
        erased = np.any(out != 7.0, axis=-1)
        if not erased.any():
            continue
        r, c = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        box = np.zeros_like(erased)
        box[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = True
        np.testing.assert_array_equal(erased, box)       # one solid rectangle
        assert np.all(out[box] != 7.0)                   # every channel of it replaced
        areas.append(box.mean())
        fills.append(out[box].ravel())
    rate, se_rate = len(areas) / n, math.sqrt(prob * (1 - prob) / n)
    assert abs(rate - prob) < 4 * se_rate, rate
    rng = np.random.default_rng(0)
    ref = np.array([_erasing_reference(rng, h, w) for _ in range(20_000)])
    se = ref.std() / math.sqrt(len(areas))
    assert abs(np.mean(areas) - ref.mean()) < 4 * se, (np.mean(areas), ref.mean(), se)
    assert min(areas) >= 0.02 * 0.8 and max(areas) <= 1 / 3 * 1.2  # rounding of the sides
    fills = np.concatenate(fills)
    assert abs(fills.mean()) < 4 / math.sqrt(len(fills)) and abs(fills.std() - 1) < 0.05


def _pil_ops(image, level, sign):
    """timm's PIL implementation of the pixel-valued RandAugment ops ('inc' set), in the
    order of ``augment._rand_augment_ops``; geometric ops are None."""
    from PIL import Image, ImageEnhance, ImageOps

    img = Image.fromarray(image)
    factor = 1.0 + sign * level * 0.9
    bits = 4 - int(level * 4)
    add = int(level * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
    return [ImageOps.autocontrast(img), ImageOps.equalize(img), ImageOps.invert(img), None,
            ImageOps.posterize(img, bits), ImageOps.solarize(img, 256 - int(level * 256)),
            img.point(lut), ImageEnhance.Color(img).enhance(factor),
            ImageEnhance.Contrast(img).enhance(factor), ImageEnhance.Brightness(img).enhance(factor),
            ImageEnhance.Sharpness(img).enhance(factor), None, None, None, None]


@pytest.mark.parametrize("level", [0.3, 0.9])
def test_rand_augment_pixel_ops_equal_pil(level):
    """Each pixel op equals PIL's (as timm applies it) exactly, for both signs of the
    enhancement factor: PIL's integer greyscale, its truncating blend and autocontrast."""
    rng = np.random.default_rng(3)
    noisy = np.clip(rng.normal(120, 40, (20, 28, 3)), 10, 230).astype(np.uint8)
    # Grey mean exactly 100.5: PIL's Contrast rounds it half up (a half-to-even round would not).
    halves = np.repeat(np.array([100, 101], np.uint8), 280).reshape(20, 28, 1).repeat(3, -1)
    for image in (noisy, halves):
        _check_pixel_ops(image, level)


def _check_pixel_ops(image, level):
    signs = set()
    for s in range(8):
        seed = tf.constant([5, s], tf.int64)
        sign = float(augment._signed(1.0, seed))
        if sign in signs:
            continue
        signs.add(sign)
        ours = augment._rand_augment_ops(tf.constant(image), tf.constant(level), seed)
        for i, (op, want) in enumerate(zip(ours, _pil_ops(image, level, sign))):
            got = op().numpy()
            assert got.dtype == np.uint8 and got.shape == image.shape, i
            if want is not None:
                np.testing.assert_array_equal(got, np.asarray(want), err_msg=f"op {i}, sign {sign}")
    assert signs == {-1.0, 1.0}


def test_repeated_augmentation_repeats_each_image_with_different_augmentations(tmp_path):
    """repeated_aug=3 (DeiT's RASampler): an epoch holds ceil(N/3) images, each exactly 3
    times, its copies in the same batch and all three augmented differently."""
    write_image_folder(tmp_path, classes=12, per_class=1, splits=("train",))  # label = image
    cfg = tiny_config(tmp_path).data
    cfg.repeated_aug, cfg.rand_augment, cfg.hflip = 3, "", True
    src = make_source("folder", str(tmp_path), "train")
    stream = train_batches(src, cfg, seed=0, local_batch=6)  # 12 // 6 = 2 steps per epoch
    epochs = []
    for _ in range(2):
        batches = [next(stream) for _ in range(2)]
        labels = np.concatenate([b["label"] for b in batches])
        ids, counts = np.unique(labels, return_counts=True)
        assert len(ids) == 4 and set(counts) == {3}, labels
        for b in batches:
            for label in np.unique(b["label"]):
                copies = b["image"][b["label"] == label]
                assert len(copies) == 3
                assert all(not np.array_equal(copies[i], copies[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
        epochs.append(set(ids))
    assert epochs[0] != epochs[1]  # each epoch draws its own third of the images
