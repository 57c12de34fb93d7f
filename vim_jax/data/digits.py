"""scikit-learn's handwritten digits as tensorflow-datasets datasets (no download needed).

1,797 real 8x8 scans of digits 0-9 (UCI optdigits test set, shipped inside scikit-learn),
stored as PNG so they go through exactly the pipeline ImageNet JPEGs go through. A fixed
stratified split holds out 20% as ``test``.

- ``SklearnDigits``: classification, one scan per example.
- ``DigitsSegmentation``: 48x48 canvases holding one to three scans (2x nearest upscale)
  at random non-overlapping places; every pixel is labelled with 1 + the digit of the scan
  whose ink covers it, or 0 (background): 11 classes. Test canvases use test scans only.
"""

import numpy as np

from vim_jax.data.tf_setup import tfds

_TEST_FRACTION = 0.2
CANVAS, SCALE, MAX_SCANS = 48, 2, 3
INK = 64  # a scan pixel above this (4 of the original 16 levels) is ink
SEG_CANVASES = {"train": 3000, "test": 600}


def load_scans():
    """(images (1797, 8, 8) uint8 0-255, digits (1797,), test mask (1797,) bool): the fixed
    stratified split, 20% of each digit held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.zeros(len(images), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        test[idx[: round(len(idx) * _TEST_FRACTION)]] = True
    return images, d.target, test


def make_canvas(images, digits, pool, rng):
    """One canvas from scans drawn out of ``pool`` (indices): (image (48, 48) uint8, mask
    (48, 48) uint8 with 0 = background, 1 + digit = ink of that digit, placements [(scan
    index, top, left)])."""
    side = 8 * SCALE
    image = np.zeros((CANVAS, CANVAS), np.uint8)
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    taken = np.zeros((CANVAS, CANVAS), bool)
    placed = []
    for _ in range(rng.integers(1, MAX_SCANS + 1)):
        for _ in range(20):  # a free place, or give this scan up
            top, left = rng.integers(0, CANVAS - side + 1, 2)
            if not taken[top:top + side, left:left + side].any():
                break
        else:
            continue
        i = int(rng.choice(pool))
        scan = np.kron(images[i], np.ones((SCALE, SCALE), np.uint8))
        image[top:top + side, left:left + side] = scan
        mask[top:top + side, left:left + side] = np.where(scan > INK, 1 + digits[i], 0)
        taken[top:top + side, left:left + side] = True
        placed.append((i, int(top), int(left)))
    return image, mask, placed


class DigitsSegmentation(tfds.core.GeneratorBasedBuilder):
    """tfds builder of the digit-canvas segmentation set (train 3000, test 600 canvases)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "48x48 canvases of 1-3 scans; masks 0 = background, 1 + digit."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1)),
                "segmentation_mask": tfds.features.Image(shape=(CANVAS, CANVAS, 1)),
                "file_name": tfds.features.Text(),
            }),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, digits, test = load_scans()
        return {split: self._generate_examples(images, digits, np.flatnonzero(test == (split == "test")),
                                               SEG_CANVASES[split], seed)
                for split, seed in (("train", 1), ("test", 2))}

    def _generate_examples(self, images, digits, pool, n, seed):
        rng = np.random.default_rng(seed)
        for k in range(n):
            image, mask, _ = make_canvas(images, digits, pool, rng)
            yield k, {"image": image[..., None], "segmentation_mask": mask[..., None],
                      "file_name": f"canvas_{k:05d}"}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """tfds builder for sklearn.datasets.load_digits (splits: train 1438, test 359)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8x8 grey scans, values 0-16 scaled to 0-255."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn
        images, targets, test = load_scans()
        return {
            "train": self._generate_examples(images[..., None], targets, np.flatnonzero(~test)),
            "test": self._generate_examples(images[..., None], targets, np.flatnonzero(test)),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "file_name": f"digit_{i:04d}"}
