"""scikit-learn's handwritten digits as a tensorflow-datasets dataset (no download needed).

1,797 real 8x8 scans of digits 0-9 (UCI optdigits test set, shipped inside scikit-learn),
stored as PNG so they go through exactly the pipeline ImageNet JPEGs go through. A fixed
stratified split holds out 20% as ``test``.
"""

import numpy as np

from vim_jax.data.tf_setup import tfds

_TEST_FRACTION = 0.2


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
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        rng = np.random.default_rng(0)
        test = np.zeros(len(images), bool)
        for c in range(10):  # stratified: 20% of each class
            idx = rng.permutation(np.flatnonzero(d.target == c))
            test[idx[: round(len(idx) * _TEST_FRACTION)]] = True
        return {
            "train": self._generate_examples(images, d.target, np.flatnonzero(~test)),
            "test": self._generate_examples(images, d.target, np.flatnonzero(test)),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "file_name": f"digit_{i:04d}"}
