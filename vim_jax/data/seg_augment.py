"""Joint image/label transforms for semantic segmentation in TensorFlow, stateless as in
``augment``: an example's augmentation is a pure function of its seed.

mmseg 0.x's ADE20K pipeline (hustvl/Vim ``seg/configs/_base_/datasets/ade20k.py``).
Train: decode -> reduce_zero_label -> keep-ratio resize by a random ratio -> random crop
(cat_max_ratio) -> flip -> photometric distortion -> normalise -> pad to the crop.
Eval: decode -> reduce_zero_label -> keep-ratio resize to ``resize_scale``, shrunk to fit
``eval_size`` -> normalise -> pad to ``eval_size``.

Images are (H, W, 3), labels (H, W) int32 with ``IGNORE`` (255) for pixels that count
nowhere. Bad masks (size unlike the image's, labels out of range) raise
``tf.errors.InvalidArgumentError`` whose message starts with the example id; the
pipeline turns it into a ``DataError``.
"""

from __future__ import annotations

from vim_jax.data import augment
from vim_jax.data.tf_setup import tf
from vim_jax.data import IGNORE

CROP_TRIES = 10  # mmseg RandomCrop: crops checked against cat_max_ratio before giving up


# ----------------------------------------------------------------------------- checks

def _checked(x, ok, example_id, template, values):
    """``x`` once ``ok`` holds; otherwise an InvalidArgumentError "<example_id><template
    formatted with values()>". The message is built only for failing examples."""
    def fail():
        msg = tf.strings.join([example_id, tf.strings.format(template, values())])
        with tf.control_dependencies([tf.debugging.Assert(ok, [msg])]):
            return tf.identity(x)

    return tf.cond(ok, lambda: tf.identity(x), fail)


def decode_pair(image_bytes, mask_bytes, *, num_classes: int, reduce_zero_label: bool,
                example_id=""):
    """Encoded image and single-channel PNG mask -> (uint8 (H, W, 3), int32 (H, W), valid).

    An undecodable image or mask gives valid=False (and a label of IGNORE the image's
    size); the pipeline replaces such examples. A mask that is not one channel, whose size
    differs from its image's, or with a label (after reduce_zero_label) outside
    0..num_classes-1 other than IGNORE raises InvalidArgumentError naming ``example_id``."""
    if not 0 < num_classes <= IGNORE:
        raise ValueError(f"num_classes={num_classes}: labels must fit below the ignore label {IGNORE}")
    example_id = tf.convert_to_tensor(example_id, tf.string)
    image, valid = augment.decode(image_bytes)
    valid = tf.logical_and(valid, augment.is_complete_image(mask_bytes))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    mask = tf.cond(valid,
                   lambda: tf.io.decode_image(mask_bytes, channels=0, expand_animations=False),
                   lambda: tf.fill(tf.stack([h, w, 1]), tf.constant(IGNORE, tf.uint8)))
    mh, mw, mc = tf.shape(mask)[0], tf.shape(mask)[1], tf.shape(mask)[2]
    mask = _checked(mask, tf.equal(mc, 1), example_id,
                    ": the mask has {} channels; a label mask is a single-channel (mode L) PNG "
                    "of class indices (convert palette or RGB masks to indices)", lambda: [mc])
    mask = _checked(mask, tf.logical_and(tf.equal(mh, h), tf.equal(mw, w)), example_id,
                    ": the mask is {}x{} (height x width) but its image is {}x{}; a mask must "
                    "label every pixel of its image", lambda: [mh, mw, h, w])
    label = tf.cast(mask[..., 0], tf.int32)
    if reduce_zero_label:
        # mmseg: 0 ("other") becomes IGNORE, classes 1.. shift down by one, IGNORE stays.
        label = tf.where(tf.equal(label, 0), IGNORE,
                         tf.where(tf.equal(label, IGNORE), IGNORE, label - 1))
    bad = tf.logical_and(label >= num_classes, tf.not_equal(label, IGNORE))
    label = _checked(label, tf.logical_not(tf.reduce_any(bad)), example_id,
                     f": the mask has label {{}}, outside 0..{num_classes - 1} and not the ignore "
                     f"label {IGNORE} (reduce_zero_label={bool(reduce_zero_label)}; is data.name "
                     f"or data.reduce_zero_label wrong for this dataset?)",
                     lambda: [tf.reduce_max(tf.where(bad, label, -1))])
    return image, tf.ensure_shape(label, (None, None)), valid


# ----------------------------------------------------------------------------- geometry

def rescale_size(h, w, scale, fit=None):
    """mmcv's keep-ratio size: factor min(long / max(h, w), short / min(h, w)) for ``scale``
    = (long, short) (a float64 scalar pair or tensor), and also <= fit (H, W) / (h, w) when
    ``fit`` is given; each side int(side * factor + 0.5). -> int32 (new_h, new_w)."""
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    long, short = tf.cast(scale[0], tf.float64), tf.cast(scale[1], tf.float64)
    f = tf.minimum(long / tf.maximum(hf, wf), short / tf.minimum(hf, wf))
    if fit is not None:
        f = tf.minimum(f, tf.minimum(fit[0] / hf, fit[1] / wf))
    nh = tf.cast(tf.floor(hf * f + 0.5), tf.int32)
    nw = tf.cast(tf.floor(wf * f + 0.5), tf.int32)
    if fit is not None:  # a factor of exactly fit/h must not round past fit
        nh, nw = tf.minimum(nh, fit[0]), tf.minimum(nw, fit[1])
    return tf.maximum(nh, 1), tf.maximum(nw, 1)


def resize_image(image, nh, nw):
    """uint8 (H, W, 3) -> uint8 (nh, nw, 3), bilinear with half-pixel centres and no
    antialiasing (OpenCV's INTER_LINEAR, which mmseg uses), rounded."""
    out = tf.image.resize(image, tf.stack([nh, nw]), method="bilinear", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def resize_label(label, nh, nw):
    """int (H, W) -> (nh, nw) by OpenCV's INTER_NEAREST (mmseg's mask resize): output pixel
    i takes source floor(i / (n / N)), so only values of ``label`` appear."""
    def index(n_out, n_in):
        step = 1.0 / (tf.cast(n_out, tf.float64) / tf.cast(n_in, tf.float64))  # OpenCV's 1/scale
        src = tf.cast(tf.floor(tf.range(n_out, dtype=tf.float64) * step), tf.int32)
        return tf.minimum(src, n_in - 1)

    h, w = tf.shape(label)[0], tf.shape(label)[1]
    return tf.gather(tf.gather(label, index(nh, h), axis=0), index(nw, w), axis=1)


def _crop_is_mixed(label, top, left, size: int, cat_max_ratio: float):
    """mmseg's test: the crop holds more than one non-ignored class and the largest has a
    share below cat_max_ratio of the non-ignored pixels."""
    crop = label[top:top + size, left:left + size]
    counts = tf.math.bincount(tf.reshape(crop, [-1]), minlength=IGNORE + 1, maxlength=IGNORE + 1)
    counts = counts[:IGNORE]
    total = tf.cast(tf.reduce_sum(counts), tf.float64)
    share = tf.cast(tf.reduce_max(counts), tf.float64) / tf.maximum(total, 1.0)
    return tf.logical_and(tf.math.count_nonzero(counts) > 1, share < cat_max_ratio)


def crop_offsets(seed, h, w, size: int):
    """The CROP_TRIES + 1 candidate crops of ``random_crop``: int32 (tops, lefts), each
    (CROP_TRIES + 1,), uniform in [0, max(h - size, 0)] and [0, max(w - size, 0)]."""
    s = tf.random.experimental.stateless_split(seed, 2)
    tops = tf.random.stateless_uniform([CROP_TRIES + 1], s[0], 0, tf.maximum(h - size, 0) + 1, tf.int32)
    lefts = tf.random.stateless_uniform([CROP_TRIES + 1], s[1], 0, tf.maximum(w - size, 0) + 1, tf.int32)
    return tops, lefts


def random_crop(image, label, seed, size: int, cat_max_ratio: float):
    """mmseg RandomCrop of image (H, W, C) and label (H, W) -> (h', w', C), (h', w') with
    h' = min(H, size), w' = min(W, size). With cat_max_ratio < 1 the first of CROP_TRIES
    ``crop_offsets`` that passes ``_crop_is_mixed`` is taken, or the next one unchecked if
    none does."""
    tops, lefts = crop_offsets(seed, tf.shape(label)[0], tf.shape(label)[1], size)
    k = tf.constant(0)
    if cat_max_ratio < 1.0:
        (k,) = tf.while_loop(
            lambda k: tf.logical_and(k < CROP_TRIES, tf.logical_not(
                _crop_is_mixed(label, tops[k], lefts[k], size, cat_max_ratio))),
            lambda k: (k + 1,), (k,))
    top, left = tops[k], lefts[k]
    return image[top:top + size, left:left + size], label[top:top + size, left:left + size]


def _pad(image, label, hw):
    """Pads the bottom and right (as mmcv.impad) to hw: the image with 0, the label with IGNORE."""
    dh, dw = hw[0] - tf.shape(label)[0], hw[1] - tf.shape(label)[1]
    image = tf.pad(image, [[0, dh], [0, dw], [0, 0]])
    label = tf.pad(label, [[0, dh], [0, dw]], constant_values=IGNORE)
    return tf.ensure_shape(image, (hw[0], hw[1], 3)), tf.ensure_shape(label, (hw[0], hw[1]))


# ----------------------------------------------------------------------------- colour

def photometric_distortion(image, seed):
    """mmseg PhotoMetricDistortion on uint8 (H, W, 3) -> float32 (H, W, 3) of whole numbers
    0..255: brightness +U(-32, 32), then contrast x U(0.5, 1.5) either first or last (even
    odds), saturation x U(0.5, 1.5), hue + randint(-18, 18) in OpenCV's 0..180 units; each
    applied with probability 0.5, each result clipped to 0..255 and made whole as mmseg's
    uint8 conversions do (truncation for brightness and contrast, rounding through HSV)."""
    s = tf.random.experimental.stateless_split(seed, 9)
    coin = lambda k: tf.random.stateless_uniform([], s[k]) < 0.5  # noqa: E731
    uniform = lambda k, lo, hi: tf.random.stateless_uniform([], s[k], lo, hi)  # noqa: E731

    def scale_shift(x, alpha=1.0, beta=0.0):
        return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))

    def via_hsv(x, op):
        return tf.round(tf.clip_by_value(op(x / 255.0) * 255.0, 0.0, 255.0))

    def maybe(k, x, op):
        return tf.cond(coin(k), lambda: op(x), lambda: x)

    def contrast(k, x):
        return maybe(k, x, lambda x: scale_shift(x, alpha=uniform(k + 1, 0.5, 1.5)))

    x = tf.cast(image, tf.float32)
    x = maybe(0, x, lambda x: scale_shift(x, beta=uniform(1, -32.0, 32.0)))
    contrast_first = coin(2)
    x = tf.cond(contrast_first, lambda: contrast(3, x), lambda: x)
    x = maybe(5, x, lambda x: via_hsv(x, lambda y: tf.image.adjust_saturation(y, uniform(6, 0.5, 1.5))))
    hue = tf.random.stateless_uniform([], s[8], -18, 18, tf.int32)  # numpy randint: 18 excluded
    x = maybe(7, x, lambda x: via_hsv(x, lambda y: tf.image.adjust_hue(y, tf.cast(hue, tf.float32) / 180.0)))
    x = tf.cond(contrast_first, lambda: x, lambda: contrast(3, x))
    return tf.ensure_shape(x, (None, None, 3))


# ----------------------------------------------------------------------------- full transforms

def train_transform(image_bytes, mask_bytes, seed, cfg, *, num_classes: int, example_id=""):
    """Encoded image and mask, seed (2,) int64, ``cfg`` the config's data section ->
    (image float32 (S, S, 3) normalised, label int32 (S, S), valid bool), S = cfg.image_size.

    Reads cfg.image_size, resize_scale (long, short), resize_ratio (lo, hi), cat_max_ratio
    (>= 1: off), hflip, photometric, reduce_zero_label, mean, std."""
    size = int(cfg.image_size)
    s = tf.random.experimental.stateless_split(seed, 4)
    image, label, valid = decode_pair(image_bytes, mask_bytes, num_classes=num_classes,
                                      reduce_zero_label=cfg.reduce_zero_label, example_id=example_id)
    lo, hi = (float(r) for r in cfg.resize_ratio)
    ratio = tf.random.stateless_uniform([], s[0], lo, hi, tf.float64)
    # mmseg: the target scale is (int(long * r), int(short * r)), then fitted keeping ratio.
    scale = [tf.floor(float(v) * ratio) for v in cfg.resize_scale]
    nh, nw = rescale_size(tf.shape(label)[0], tf.shape(label)[1], scale)
    image, label = resize_image(image, nh, nw), resize_label(label, nh, nw)
    image, label = random_crop(image, label, s[1], size, float(cfg.cat_max_ratio))
    if cfg.hflip:
        flip = tf.random.stateless_uniform([], s[2]) < 0.5
        image, label = tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))
    if cfg.photometric:
        image = photometric_distortion(image, s[3])
    image, label = _pad(augment.normalise(image, cfg.mean, cfg.std), label, (size, size))
    return image, label, valid


def eval_transform(image_bytes, mask_bytes, cfg, *, num_classes: int, example_id=""):
    """Encoded image and mask -> (image float32 (He, We, 3) normalised, label int32 (He, We),
    valid bool), (He, We) = cfg.eval_size: resized keeping ratio to fit cfg.resize_scale (and
    eval_size), padded at the bottom and right with 0 / IGNORE.

    Reads cfg.eval_size, resize_scale, reduce_zero_label, mean, std."""
    fit = tuple(int(v) for v in cfg.eval_size)
    image, label, valid = decode_pair(image_bytes, mask_bytes, num_classes=num_classes,
                                      reduce_zero_label=cfg.reduce_zero_label, example_id=example_id)
    nh, nw = rescale_size(tf.shape(label)[0], tf.shape(label)[1],
                          [float(v) for v in cfg.resize_scale], fit=fit)
    image, label = resize_image(image, nh, nw), resize_label(label, nh, nw)
    image, label = _pad(augment.normalise(image, cfg.mean, cfg.std), label, fit)
    return image, label, valid
