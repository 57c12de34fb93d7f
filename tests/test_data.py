"""Input pipeline: augmentation determinism, corrupt images, sources, resumable order, mixing."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from conftest import tiny_config, write_image_folder  # noqa: E402
from vim_jax.data import augment  # noqa: E402
from vim_jax.data.mixing import mix_batch  # noqa: E402
from vim_jax.data.pipeline import CorruptImages, eval_batches, train_batches  # noqa: E402
from vim_jax.data.sources import DataError, make_source  # noqa: E402
from vim_jax.data.tf_setup import tf  # noqa: E402


def _encoded(fmt="JPEG", size=(40, 50)):
    from PIL import Image

    img = (np.random.default_rng(1).random(size + (3,)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data,ok", [
    (_encoded("JPEG"), True), (_encoded("PNG"), True),
    (_encoded("JPEG")[:300], False), (_encoded("PNG")[:-20], False),
    (b"this is a text file called img.JPEG", False), (b"", False)])
def test_corrupt_images_are_detected(data, ok):
    assert bool(augment.is_complete_image(tf.constant(data))) == ok


def test_train_transform_is_a_function_of_the_seed():
    cfg = tiny_config("unused").data
    cfg.image_size, cfg.rand_augment, cfg.random_erasing, cfg.hflip = 32, "rand-m9-mstd0.5-inc1", 0.25, True
    f = tf.function(lambda d, s: augment.train_transform(d, s, cfg))
    data = tf.constant(_encoded())
    a, valid = f(data, tf.constant([3, 4], tf.int64))
    b, _ = f(data, tf.constant([3, 4], tf.int64))
    c, _ = f(data, tf.constant([3, 5], tf.int64))
    assert a.shape == (32, 32, 3) and bool(valid)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_every_rand_augment_op_keeps_shape_and_dtype():
    image = tf.constant((np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8))
    for level in (0.0, 0.5, 1.0):
        for op in augment._rand_augment_ops(image, tf.constant(level), tf.constant([1, 2])):
            out = op()
            assert out.dtype == tf.uint8 and out.shape == image.shape


def test_rand_augment_spec_is_validated():
    assert augment.parse_rand_augment("rand-m9-mstd0.5-inc1") == dict(
        magnitude=9.0, magnitude_std=0.5, num_layers=2, magnitude_max=10.0)
    with pytest.raises(ValueError, match="rand-m9"):
        augment.parse_rand_augment("randaug-9")


def test_resumed_stream_equals_uninterrupted(tmp_path):
    """The batches from step s on are the same whether the stream started at 0 or at s."""
    write_image_folder(tmp_path, classes=3, per_class=7, splits=("train",))
    cfg = tiny_config(tmp_path)
    cfg.data.repeated_aug, cfg.data.rand_augment = 3, "rand-m9-mstd0.5-inc1"
    src = make_source("folder", str(tmp_path), "train")
    full = train_batches(src, cfg.data, seed=0, local_batch=4)
    first = [next(full) for _ in range(8)]  # 5 steps/epoch: crosses an epoch boundary
    resumed = train_batches(src, cfg.data, seed=0, local_batch=4, start_step=3)
    for want in first[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # Another seed shuffles differently; epochs differ from each other.
    other = next(train_batches(src, cfg.data, seed=1, local_batch=4))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_folder_is_sharded_over_processes(tmp_path):
    """Two processes see disjoint shares covering the split, and run the same number of
    eval batches although their shares differ (5 and 4 images)."""
    write_image_folder(tmp_path, classes=3, per_class=3, splits=("val",))
    cfg = tiny_config(tmp_path).data
    seen, counts = [], []
    for p in range(2):
        src = make_source("folder", str(tmp_path), "val", process_index=p, process_count=2)
        assert src.num_examples == 5 - p and src.num_classes == 3
        batches = list(eval_batches(src, cfg, local_batch=4))
        counts.append(len(batches))
        for b in batches:
            seen += [img.tobytes() for img, m in zip(b["image"], b["mask"]) if m]
    assert counts == [2, 2]
    assert len(seen) == 9 and len(set(seen)) == 9


def test_folder_streams_from_disk(tmp_path):
    """The folder source keeps only the file list: an image rewritten after the source and
    its dataset were made is read as it is on disk when the pipeline reaches it. File order
    is a function of the seed. A val/ class that train/ lacks is an error naming it."""
    write_image_folder(tmp_path, classes=2, per_class=3, splits=("train", "val"))
    src = make_source("folder", str(tmp_path), "train")
    ds = src.dataset(shuffle_seed=None)
    target = tmp_path / "train" / "class_00" / "img_000.JPEG"
    target.write_bytes(b"rewritten after listing")
    first = next(iter(ds.as_numpy_iterator()))
    assert first["image"] == b"rewritten after listing" and first["id"].decode() == str(target)
    order = lambda seed: [ex["id"] for ex in src.dataset(shuffle_seed=seed).as_numpy_iterator()]
    assert order(1) == order(1) and sorted(order(1)) == sorted(order(None)) and order(1) != order(2)
    (tmp_path / "val" / "class_zz").mkdir()
    with pytest.raises(DataError, match="class directories that .*train lacks: \\['class_zz'\\]"):
        make_source("folder", str(tmp_path), "val")


def test_corrupt_jpeg_is_counted_and_replaced(tmp_path, caplog):
    write_image_folder(tmp_path, classes=2, per_class=4, splits=("train", "val"))
    bad = tmp_path / "train" / "class_01" / "img_001.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated download
    (tmp_path / "val" / "class_00" / "img_000.JPEG").write_bytes(b"not an image at all" * 4)
    cfg = tiny_config(tmp_path).data
    corrupt = CorruptImages()
    src = make_source("folder", str(tmp_path), "train")
    batches = train_batches(src, cfg, seed=0, local_batch=8, corrupt=corrupt)
    with caplog.at_level("WARNING"):
        batch = next(batches)
    assert corrupt.count == 1 and "img_001.JPEG" in corrupt.ids[0]
    assert "corrupt image" in caplog.text and "img_001.JPEG" in caplog.text
    assert batch["image"].shape[0] == 8 and np.isfinite(batch["image"]).all()
    # In evaluation the corrupt image is reported and left out of the count.
    vsrc = make_source("folder", str(tmp_path), "val")
    masks = [b["mask"] for b in eval_batches(vsrc, cfg, local_batch=8, corrupt=corrupt)]
    assert corrupt.count == 2 and float(np.sum(masks)) == 7


def test_missing_data_gives_instructions(tmp_path):
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar.*tfds build imagenet2012"):
        make_source("imagenet2012", str(tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match="no 'train' subdirectory.*does not exist"):
        make_source("folder", str(tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match="not one of"):
        make_source("cifar", "", "train")


def test_digits_dataset_is_built_from_scikit_learn(tmp_path):
    train = make_source("digits", str(tmp_path), "train")
    test = make_source("digits", str(tmp_path), "test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1438, 359, 10)
    ex = next(iter(test.dataset()))
    image, valid = augment.decode(ex["image"])
    assert bool(valid) and image.shape == (8, 8, 3)


def test_mixing_targets_are_distributions():
    key = jax.random.key(0)
    images = jax.random.normal(key, (6, 8, 8, 3))
    labels = jnp.arange(6) % 4
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)]:
        for k in range(4):
            out, targets = mix_batch(jax.random.key(k), images, labels, num_classes=4, mixup=mixup,
                                     cutmix=cutmix, smoothing=0.1)
            assert out.shape == images.shape
            np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
            # Each row mixes its own class with the reversed batch's: lam on one, 1 - lam on the other.
            own = targets[jnp.arange(6), labels] - 0.1 / 4
            rev = targets[jnp.arange(6), labels[::-1]] - 0.1 / 4
            assert jnp.all(own >= -1e-6) and jnp.all(rev >= -1e-6)
    out, targets = mix_batch(key, images, labels, num_classes=4, mixup=0, cutmix=0, smoothing=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, 4))


def test_digit_canvases_label_every_pixel_by_the_scan_that_inks_it(tmp_path):
    """Canvases for the segmentation demo: 1-3 scans (2x nearest) in disjoint boxes; a pixel
    is 1 + digit exactly where that scan has ink, 0 elsewhere; test canvases use only held-out
    scans. The tfds builder holds 3000 / 600 such canvases."""
    from vim_jax.data.digits import INK, DigitsSegmentation, load_scans, make_canvas

    images, digits, test = load_scans()
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(60):
        image, mask, placed = make_canvas(images, digits, np.flatnonzero(test), rng)
        sizes.add(len(placed))
        covered = np.zeros(image.shape, int)
        for i, top, left in placed:
            assert test[i]
            box = (slice(top, top + 16), slice(left, left + 16))
            covered[box] += 1
            np.testing.assert_array_equal(image[box][::2, ::2], images[i])
            np.testing.assert_array_equal(image[box][1::2, 1::2], images[i])
            assert set(np.unique(mask[box])) <= {0, 1 + digits[i]}
        assert covered.max() <= 1  # the boxes never overlap
        np.testing.assert_array_equal(mask > 0, image > INK)
        assert not image[covered == 0].any()
    assert sizes == {1, 2, 3}
    builder = DigitsSegmentation(data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 3000, "test": 600}
    ex = next(iter(builder.as_dataset(split="test").take(1)))
    assert ex["image"].shape == (48, 48, 1) and int(tf.reduce_max(ex["segmentation_mask"])) <= 10
