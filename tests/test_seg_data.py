"""Segmentation input pipeline: joint image/mask transforms (mmseg's ADE20K pipeline), the
ADE20K and digit-canvas sources, mask checks surfacing as DataError."""

import io

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from ml_collections import ConfigDict  # noqa: E402

from vim_jax.data import seg_augment  # noqa: E402
from vim_jax.data.pipeline import CorruptImages, eval_batches, train_batches  # noqa: E402
from vim_jax.data.sources import ADE20K_URL, DataError, make_source  # noqa: E402
from vim_jax.data.tf_setup import tf  # noqa: E402
from vim_jax.train.segmentation import IGNORE  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cfg(**over):
    c = ConfigDict(dict(image_size=32, resize_scale=(128, 32), resize_ratio=(0.5, 2.0),
                        cat_max_ratio=0.75, hflip=True, photometric=True, reduce_zero_label=False,
                        mean=MEAN, std=STD, eval_size=(32, 64), shuffle_buffer=16, repeated_aug=1))
    c.update(over)
    return c


def _encode(array, fmt="PNG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _blocks(h, w, values, seed=0):
    """A label map of 4x4 blocks drawn from ``values``."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(np.asarray(values), ((h + 3) // 4, (w + 3) // 4))
    return np.kron(coarse, np.ones((4, 4), np.int64))[:h, :w].astype(np.uint8)


def _write_ade(root, n=(5, 3), size=(30, 40), labels=(0, 1, 7, 150)):
    """An ADE20K-layout release under root/ADEChallengeData2016 with n (training,
    validation) JPEG images and mode-L PNG annotations."""
    base = root / "ADEChallengeData2016"
    for split, count in zip(("training", "validation"), n):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            stem = f"ADE_{split[:5]}_{i:08d}"
            (base / "images" / split / f"{stem}.jpg").write_bytes(_encode(_image(*size, i), "JPEG"))
            (base / "annotations" / split / f"{stem}.png").write_bytes(_encode(_blocks(*size, labels, i)))
    return base


def test_train_transform_shapes_dtypes_and_seed():
    """(S, S, 3) float32, (S, S) int32, a function of the seed; the labels are values of
    the mask (or the padding's IGNORE), never interpolated ones."""
    cfg = _cfg()
    mask = _blocks(40, 60, (0, 3, 5, 9, IGNORE))
    f = tf.function(lambda i, m, s: seg_augment.train_transform(i, m, s, cfg, num_classes=10))
    data = (tf.constant(_encode(_image(40, 60), "JPEG")), tf.constant(_encode(mask)))
    outs = [f(*data, tf.constant(s, tf.int64)) for s in ([1, 2], [1, 2], [1, 3])]
    image, label, valid = outs[0]
    assert image.shape == (32, 32, 3) and image.dtype == tf.float32 and bool(valid)
    assert label.shape == (32, 32) and label.dtype == tf.int32
    for a, b in zip(outs[0][:2], outs[1][:2]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(outs[0][0].numpy(), outs[2][0].numpy())
    for s in range(8):
        _, label, _ = f(*data, tf.constant([5, s], tf.int64))
        assert set(np.unique(label.numpy())) <= {0, 3, 5, 9, IGNORE}


def test_reduce_zero_label_and_nearest_resize():
    """reduce_zero_label: 0 -> IGNORE, k -> k - 1, IGNORE stays. Nearest resizing, up or
    down, only ever copies label values, as OpenCV's INTER_NEAREST (floor(i * in / out))."""
    mask = np.array([[0, 1, 5, IGNORE]], np.uint8).repeat(2, 0)
    _, label, valid = seg_augment.decode_pair(tf.constant(_encode(_image(2, 4))), tf.constant(_encode(mask)),
                                              num_classes=5, reduce_zero_label=True)
    assert bool(valid)
    np.testing.assert_array_equal(label.numpy()[0], [IGNORE, 0, 4, IGNORE])
    label = _blocks(37, 23, (3, 7, 200, IGNORE)).astype(np.int32)
    for nh, nw in [(11, 9), (74, 46), (50, 17), (37, 23)]:
        out = seg_augment.resize_label(tf.constant(label), nh, nw).numpy()
        rows = np.minimum(np.floor(np.arange(nh) * 37 / nh).astype(int), 36)
        cols = np.minimum(np.floor(np.arange(nw) * 23 / nw).astype(int), 22)
        np.testing.assert_array_equal(out, label[rows][:, cols])
        assert set(np.unique(out)) <= {3, 7, 200, IGNORE}


def test_small_images_are_padded_with_ignore():
    """A resized image smaller than the crop is padded at the bottom and right: image 0
    (after normalisation), label IGNORE. 10x12 fitted to (16, 8): factor 0.8 -> 8x10."""
    cfg = _cfg(resize_scale=(16, 8), resize_ratio=(1.0, 1.0), photometric=False, hflip=False)
    mask = np.full((10, 12), 4, np.uint8)
    image, label, _ = seg_augment.train_transform(
        tf.constant(_encode(_image(10, 12))), tf.constant(_encode(mask)), tf.constant([0, 0], tf.int64),
        cfg, num_classes=5)
    image, label = image.numpy(), label.numpy()
    assert (label[:8, :10] == 4).all()
    assert (label[8:] == IGNORE).all() and (label[:, 10:] == IGNORE).all()
    assert (image[8:] == 0).all() and (image[:, 10:] == 0).all() and (image[:8, :10] != 0).any()


def test_crop_follows_cat_max_ratio():
    """mmseg's RandomCrop: the first of 10 candidate crops whose largest non-ignored class has
    a share below cat_max_ratio (and that holds two classes), else the 11th draw. A 48x48
    mask of class 1 with a 20x20 square of class 2 and an ignored band: a 32 crop
    qualifies only when it holds enough of the square, so redraws are needed."""
    size, ratio = 32, 0.75
    label = np.ones((48, 48), np.int32)
    label[24:44, 24:44] = 2
    label[:, :4] = IGNORE
    pos = np.stack(np.meshgrid(np.arange(48), np.arange(48), indexing="ij"), -1)  # (row, col) per pixel

    def share_ok(top, left):
        crop = label[top:top + size, left:left + size]
        counts = np.bincount(crop[crop != IGNORE], minlength=3)
        return (counts > 0).sum() > 1 and counts.max() / counts.sum() < ratio

    crop = tf.function(lambda s, r: seg_augment.random_crop(tf.constant(pos), tf.constant(label), s, size, r))
    redrawn = unsatisfiable = 0
    for s in range(24):
        seed = tf.constant([7, s], tf.int64)
        tops, lefts = (t.numpy() for t in seg_augment.crop_offsets(seed, 48, 48, size))
        ok = [share_ok(t, l) for t, l in zip(tops, lefts)]
        want = next((k for k in range(10) if ok[k]), 10)
        redrawn += want > 0
        unsatisfiable += not any(ok[:10])
        got, got_label = crop(seed, ratio)
        assert tuple(got.numpy()[0, 0]) == (tops[want], lefts[want])
        np.testing.assert_array_equal(got_label.numpy(), label[tops[want]:tops[want] + size,
                                                               lefts[want]:lefts[want] + size])
        if any(ok[:10]):
            assert share_ok(tops[want], lefts[want])
        off, _ = crop(seed, 1.0)  # off: the first draw
        assert tuple(off.numpy()[0, 0]) == (tops[0], lefts[0])
    assert redrawn >= 5 and unsatisfiable == 0


def test_eval_transform_fits_and_pads_to_eval_size():
    """Keep-ratio resize to resize_scale (20x30 to (64, 16): factor 0.8 -> 16x24), shrunk
    further when eval_size needs it (to 12 rows: factor 0.6 -> 12x18), padded with IGNORE."""
    mask = _blocks(20, 30, (1, 2, 3))
    data = (tf.constant(_encode(_image(20, 30), "JPEG")), tf.constant(_encode(mask)))
    for eval_size, (h, w) in [((32, 64), (16, 24)), ((12, 64), (12, 18))]:
        cfg = _cfg(resize_scale=(64, 16), eval_size=eval_size)
        image, label, valid = seg_augment.eval_transform(*data, cfg, num_classes=4)
        image, label = image.numpy(), label.numpy()
        assert image.shape == eval_size + (3,) and label.shape == eval_size and bool(valid)
        assert set(np.unique(label[:h, :w])) <= {1, 2, 3}
        assert (label[h:] == IGNORE).all() and (label[:, w:] == IGNORE).all()
        assert (image[h:] == 0).all() and (image[:, w:] == 0).all()


def test_ade20k_source_pairs_files_and_explains_what_is_missing(tmp_path):
    base = _write_ade(tmp_path)
    for data_dir in (tmp_path, base):  # the release directory or its parent
        src = make_source("ade20k", str(data_dir), "training")
        assert (src.task, src.num_classes, src.num_examples) == ("segmentation", 150, 5)
    shares = [make_source("ade20k", str(tmp_path), "training", process_index=p, process_count=2)
              for p in range(2)]
    assert [s.num_examples for s in shares] == [3, 2] and shares[1].min_num_examples == 2
    ex = next(src.dataset(shuffle_seed=None).as_numpy_iterator())
    assert ex["id"].decode().endswith("images/training/ADE_train_00000000.jpg")
    assert ex["mask"] == (base / "annotations/training/ADE_train_00000000.png").read_bytes()
    order = lambda seed: [e["id"] for e in src.dataset(shuffle_seed=seed).as_numpy_iterator()]  # noqa: E731
    assert sorted(order(3)) == order(None) and order(3) == order(3)

    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{nowhere}.*does not exist.*{ADE20K_URL}.*"
                                        "DIR/ADEChallengeData2016/images/training.*data_dir=DIR"):
        make_source("ade20k", str(nowhere), "validation")
    (base / "annotations/validation/ADE_valid_00000001.png").unlink()
    with pytest.raises(DataError, match="ADE_valid_00000001.jpg needs .*ADE_valid_00000001.png"):
        make_source("ade20k", str(tmp_path), "validation")


def test_bad_masks_are_data_errors_naming_the_file(tmp_path):
    """Through train_batches and eval_batches: a mask of another size than its image, and a
    label out of range, raise DataError with the file and the value; a truncated image is
    replaced within its batch and counted, as in classification."""
    base = _write_ade(tmp_path, n=(4, 2))
    cfg = _cfg(reduce_zero_label=True, eval_size=(32, 48))
    src = make_source("ade20k", str(tmp_path), "training")
    batch = next(train_batches(src, cfg, seed=0, local_batch=2))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].shape == (2, 32, 32)
    assert batch["label"].dtype == np.int32 and set(np.unique(batch["label"])) <= {0, 6, 149, IGNORE}
    vsrc = make_source("ade20k", str(tmp_path), "validation")
    batches = list(eval_batches(vsrc, cfg, local_batch=3))
    assert len(batches) == 1 and batches[0]["label"].shape == (3, 32, 48)
    np.testing.assert_array_equal(batches[0]["mask"], [1, 1, 0])
    assert (batches[0]["label"][2] == IGNORE).all()

    bad = base / "images/training/ADE_train_00000001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: replaced and counted, as in classification
    corrupt = CorruptImages()
    batch = next(train_batches(src, cfg, seed=1, local_batch=4, corrupt=corrupt))  # the whole split
    assert corrupt.count == 1 and "ADE_train_00000001.jpg" in corrupt.ids[0]
    assert np.isfinite(batch["image"]).all()

    (base / "annotations/training/ADE_train_00000002.png").write_bytes(_encode(_blocks(30, 41, (1,))))
    with pytest.raises(DataError, match=r"ADE_train_00000002\.jpg: the mask is 30x41 .* its image is 30x40"):
        batches = train_batches(src, cfg, seed=0, local_batch=2)
        for _ in range(2):  # one epoch
            next(batches)
    (base / "annotations/validation/ADE_valid_00000001.png").write_bytes(_encode(_blocks(30, 40, (1, 200))))
    with pytest.raises(DataError, match=r"ADE_valid_00000001\.jpg: the mask has label 199, outside 0\.\.149"):
        list(eval_batches(vsrc, cfg, local_batch=3))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_seg"))


def test_digit_canvases_make_48x48_batches(digits_dir):
    cfg = _cfg(image_size=48, resize_scale=(48, 48), eval_size=(48, 48), mean=(0.5,) * 3, std=(0.5,) * 3)
    src = make_source("digits_seg", digits_dir, "test")
    assert (src.task, src.num_classes, src.num_examples) == ("segmentation", 11, 600)
    batch = next(train_batches(src, cfg, seed=0, local_batch=8))
    assert batch["image"].shape == (8, 48, 48, 3) and batch["label"].shape == (8, 48, 48)
    assert set(np.unique(batch["label"])) <= set(range(11)) | {IGNORE}
    batch = next(eval_batches(src, cfg, local_batch=8))
    assert batch["image"].shape == (8, 48, 48, 3) and batch["mask"].all()
    assert batch["label"].min() >= 0 and batch["label"].max() <= 10 and batch["label"].max() > 0
