"""Host-side image transforms in TensorFlow, all stateless: an example's augmentation is a
pure function of its seed, so runs are reproducible whatever the tf.data parallelism and
a resumed run sees exactly the images an uninterrupted one would.

Train: decode -> random resized crop (bicubic) -> flip -> RandAugment -> normalise ->
random erasing. Eval: decode -> resize the short side to size / crop_ratio -> centre crop.
"""

from __future__ import annotations

import math
import re

from vim_jax.data.tf_setup import tf

_FILL = (124, 116, 104)  # timm's fill colour for geometric ops: the ImageNet mean in uint8


# ----------------------------------------------------------------------------- decoding

def _contains(tail, pattern: bytes):
    """Whether the byte string ``tail`` contains ``pattern``."""
    t = tf.io.decode_raw(tail, tf.uint8)
    n = len(pattern)
    hit = tf.ones_like(t[: tf.size(t) - n + 1], tf.bool)
    for i, byte in enumerate(pattern):
        hit = tf.logical_and(hit, tf.equal(t[i: tf.size(t) - n + 1 + i], byte))
    return tf.reduce_any(hit)


# WebP is an image here only where TensorFlow decodes it (tf.io.decode_webp, TF 2.17+).
DECODES_WEBP = hasattr(tf.io, "decode_webp")


def is_complete_image(data):
    """Cheap structural check of encoded bytes: a JPEG must hold its end marker, a PNG its
    IEND chunk near the end; GIF, BMP and (where decodable) WebP are trusted; anything else
    is not an image."""
    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 8)
    tail = tf.strings.substr(data, tf.maximum(n - 64, 0), 64)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
    is_png = tf.equal(head, b"\x89PNG\r\n\x1a\n")
    is_other = tf.logical_or(tf.equal(tf.strings.substr(head, 0, 3), b"GIF"),
                             tf.equal(tf.strings.substr(head, 0, 2), b"BM"))
    if DECODES_WEBP:
        padded = tf.strings.join([data, b"\0" * 12])  # substr past the end is an error
        is_webp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
                                 tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP"))
        is_other = tf.logical_or(is_other, is_webp)
    jpeg_ok = tf.logical_and(is_jpeg, _contains(tail, b"\xff\xd9"))
    png_ok = tf.logical_and(is_png, _contains(tail, b"IEND"))
    ok = tf.logical_or(jpeg_ok, tf.logical_or(png_ok, is_other))
    return tf.logical_and(n > 16, ok)


def decode(data):
    """Encoded bytes -> (uint8 (H, W, 3), valid). Incomplete files give a 1x1 black image and
    valid=False; the pipeline replaces and counts them."""
    valid = is_complete_image(data)
    image = tf.cond(
        valid,
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
        lambda: tf.zeros((1, 1, 3), tf.uint8))
    return tf.ensure_shape(image, (None, None, 3)), valid


# ----------------------------------------------------------------------------- geometry

def _resize(image, size):
    """Bicubic (antialiased, like PIL) resize of a uint8 image, rounded back to uint8."""
    out = tf.image.resize(image, size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception crop (random area fraction in ``scale``, log-uniform aspect) resized to size.
    (Decoding only the window of a JPEG, ``decode_and_crop_jpeg``, measured no faster at
    ImageNet sizes: benchmarks/input_pipeline.py.)"""
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4), tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop)
    return _resize(image, (size, size))


def centre_crop(image, size: int, crop_ratio: float):
    """Resize the short side to floor(size / crop_ratio) (bicubic), then a central size x size."""
    scale_size = int(math.floor(size / crop_ratio))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * scale_size / short), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * scale_size / short), tf.int32)
    image = _resize(image, tf.stack([tf.maximum(nh, size), tf.maximum(nw, size)]))
    top = (tf.shape(image)[0] - size) // 2
    left = (tf.shape(image)[1] - size) // 2
    return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, 3))


def _affine(image, matrix):
    """Applies the 8-parameter projective ``matrix`` (output -> input coords), timm's fill."""
    fill = tf.constant(_FILL, tf.float32)
    x = tf.cast(image, tf.float32)[None] - fill  # transform with fill 0, so outside == fill
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=tf.cast(matrix, tf.float32)[None], output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.cast(tf.clip_by_value(tf.round(out[0] + fill), 0, 255), tf.uint8)


def _about_centre(image, a, b, c, d):
    """Matrix for the linear map [[a, b], [c, d]] about the image centre."""
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return tf.stack([a, b, cx - a * cx - b * cy, c, d, cy - c * cx - d * cy, 0.0, 0.0])


# ----------------------------------------------------------------------------- RandAugment

def _blend(a, b, factor):
    """PIL ImageEnhance: a + factor * (b - a), where a is the degenerate image, truncated
    to uint8 as PIL's Image.blend does."""
    out = tf.cast(a, tf.float32) + factor * (tf.cast(b, tf.float32) - tf.cast(a, tf.float32))
    return tf.cast(tf.clip_by_value(tf.floor(out), 0, 255), tf.uint8)


def _grey(image):
    """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, as RGB."""
    x = tf.cast(image, tf.int32)
    g = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 0x10000
    return tf.cast(tf.tile(g[..., None], [1, 1, 3]), tf.uint8)


def _autocontrast(image):
    """PIL's ImageOps.autocontrast per channel: int(x * scale + offset), in float64 as PIL."""
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = tf.where(hi > lo, x * scale + -lo * scale, x)
    return tf.cast(tf.clip_by_value(tf.floor(out), 0, 255), tf.uint8)


def _equalize_channel(c):
    hist = tf.math.bincount(tf.cast(c, tf.int32), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255

    def lut():
        table = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
        table = tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(table, tf.cast(c, tf.int32)), tf.uint8)

    return tf.cond(step > 0, lut, lambda: c)


def _equalize(image):
    return tf.stack([_equalize_channel(image[..., i]) for i in range(3)], -1)


def _sharpness(image, factor):
    x = tf.cast(image, tf.float32)[None]
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0, 255), tf.uint8)
    # PIL keeps the border pixels unchanged.
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    mask = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(mask, degenerate, image)
    return _blend(degenerate, image, factor)


def _signed(level, seed):
    sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
    return level * sign


def _rand_augment_ops(image, level, seed):
    """timm's 'inc' (increasing magnitude) RandAugment ops at level in [0, 1]."""
    def enhance(degenerate):
        return lambda: _blend(degenerate(), image, 1.0 + _signed(level * 0.9, seed))

    def rotate():
        t = _signed(level * 30.0, seed) * math.pi / 180
        cos, sin = tf.cos(t), tf.sin(t)
        return _affine(image, _about_centre(image, cos, -sin, sin, cos))

    def shear(axis):
        s = _signed(level * 0.3, seed)
        return lambda: _affine(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]) if axis == 0
                               else tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]))

    def translate(axis):
        size = tf.cast(tf.shape(image)[1 - axis], tf.float32)
        d = _signed(level * 0.45, seed) * size
        return lambda: _affine(image, tf.stack([1.0, 0.0, d, 0.0, 1.0, 0.0, 0.0, 0.0]) if axis == 0
                               else tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, d, 0.0, 0.0]))

    def posterize():
        bits = 4 - tf.cast(level * 4, tf.int32)
        shift = tf.cast(8 - bits, tf.uint8)
        return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)

    def solarize():
        thresh = 256 - tf.cast(level * 256, tf.int32)
        return tf.where(tf.cast(image, tf.int32) >= thresh, 255 - image, image)

    def solarize_add():
        add = tf.cast(level * 110, tf.int32)
        x = tf.cast(image, tf.int32)
        return tf.cast(tf.where(x < 128, tf.minimum(x + add, 255), x), tf.uint8)

    def brightness_degenerate():
        return tf.zeros_like(image)

    def contrast_degenerate():  # PIL: int(mean of the grey image + 0.5), in double precision
        mean = tf.reduce_mean(tf.cast(_grey(image)[..., 0], tf.float64))
        return tf.cast(tf.fill(tf.shape(image), tf.floor(mean + 0.5)), tf.uint8)

    return [
        lambda: _autocontrast(image), lambda: _equalize(image), lambda: 255 - image, rotate,
        posterize, solarize, solarize_add, enhance(lambda: _grey(image)),
        enhance(contrast_degenerate), enhance(brightness_degenerate),
        lambda: _sharpness(image, 1.0 + _signed(level * 0.9, seed)),
        shear(0), shear(1), translate(0), translate(1),
    ]


def parse_rand_augment(spec: str) -> dict:
    """timm notation 'rand-m9-mstd0.5-inc1' -> {magnitude, magnitude_std, num_layers}."""
    m = re.fullmatch(r"rand((?:-(?:m[\d.]+|mstd[\d.]+|n\d+|inc1|mmax[\d.]+))*)", spec or "")
    if not m or "-inc1" not in spec:
        raise ValueError(f"rand_augment={spec!r}: expected timm notation like "
                         "'rand-m9-mstd0.5-inc1' (the increasing-magnitude op set is required)")
    out = {"magnitude": 9.0, "magnitude_std": 0.5, "num_layers": 2, "magnitude_max": 10.0}
    for part in spec.split("-")[1:]:
        key = re.match(r"[a-z]+", part).group()
        val = part[len(key):]
        if key == "m":
            out["magnitude"] = float(val)
        elif key == "mstd":
            out["magnitude_std"] = float(val)
        elif key == "n":
            out["num_layers"] = int(val)
        elif key == "mmax":
            out["magnitude_max"] = float(val)
    return out


def rand_augment(image, seed, magnitude=9.0, magnitude_std=0.5, num_layers=2, magnitude_max=10.0,
                 prob=0.5):
    """timm RandAugment: ``num_layers`` ops drawn with replacement, each applied with ``prob``,
    magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max]."""
    for i in range(num_layers):
        s = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 4)
        apply = tf.random.stateless_uniform([], s[0]) < prob
        m = magnitude + magnitude_std * tf.random.stateless_normal([], s[1])
        level = tf.clip_by_value(m, 0.0, magnitude_max) / 10.0
        ops = _rand_augment_ops(image, level, s[2])
        idx = tf.random.stateless_uniform([], s[3], 0, len(ops), dtype=tf.int32)
        image = tf.cond(apply, lambda: tf.switch_case(idx, ops), lambda: image)
        image = tf.ensure_shape(image, (None, None, 3))
    return image


# ----------------------------------------------------------------------------- erasing

def random_erasing(image, seed, prob: float, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """timm RandomErasing(mode='pixel', count 1) on a normalised float image: with ``prob``,
    one box (first of 10 tries that fits) is filled with N(0, 1) noise."""
    s = tf.random.experimental.stateless_split(seed, 5)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    target = tf.random.stateless_uniform([10], s[0], area[0], area[1]) * hf * wf
    ratio = tf.exp(tf.random.stateless_uniform([10], s[1], log_ratio[0], log_ratio[1]))
    eh = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
    fits = tf.logical_and(eh < h, ew < w)
    k = tf.argmax(tf.cast(fits, tf.int32))
    eh, ew = eh[k], ew[k]
    top = tf.random.stateless_uniform([], s[2], 0, tf.maximum(h - eh, 0) + 1, tf.int32)
    left = tf.random.stateless_uniform([], s[3], 0, tf.maximum(w - ew, 0) + 1, tf.int32)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    do = tf.logical_and(tf.random.stateless_uniform([], s[4]) < prob, tf.reduce_any(fits))

    def erase():  # noise is drawn only for the images that are erased
        noise = tf.random.stateless_normal(tf.shape(image), tf.random.experimental.stateless_fold_in(seed, 7))
        return tf.where(box, noise, image)

    return tf.cond(do, erase, lambda: image)


# ----------------------------------------------------------------------------- full transforms

def normalise(image, mean, std):
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_transform(data, seed, cfg):
    """Encoded bytes, seed (2,) int -> (float32 (S, S, 3) normalised, valid)."""
    s = tf.random.experimental.stateless_split(seed, 4)
    image, valid = decode(data)
    image = random_resized_crop(image, s[0], cfg.image_size, scale=tuple(cfg.rrc_scale))
    if cfg.hflip:
        image = tf.image.stateless_random_flip_left_right(image, s[1])
    if cfg.rand_augment:
        image = rand_augment(image, s[2], **parse_rand_augment(cfg.rand_augment))
    x = normalise(image, cfg.mean, cfg.std)
    if cfg.random_erasing > 0:
        x = random_erasing(x, s[3], cfg.random_erasing)
    return tf.ensure_shape(x, (cfg.image_size, cfg.image_size, 3)), valid


def eval_transform(data, cfg):
    """Encoded bytes -> (float32 (S, S, 3) normalised, valid)."""
    image, valid = decode(data)
    image = centre_crop(image, cfg.image_size, cfg.eval_crop_ratio)
    return normalise(image, cfg.mean, cfg.std), valid
