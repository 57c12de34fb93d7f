"""python -m vim_jax.predict: the NumPy/PIL preprocessing against the evaluation pipeline,
top-k classes and features for images the test writes."""

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import fixture_path
import vim_jax
from vim_jax import predict


def _photo(path, size=(300, 200), seed=0):
    """An image (JPEG or PNG by the suffix) with smooth structure and noise."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(9 * xx + 3 * yy), np.cos(7 * yy), np.sin(5 * (xx + yy))], -1) * 90 + 128
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=92)
    return path


# Grey levels of 255 by which the two transforms may differ, (mean, max). Lossless PNG: only
# the resamplers differ (PIL's and TensorFlow's antialiased bicubic round differently).
# JPEG: the decoders differ too (PIL's and TensorFlow's libjpeg builds upsample chroma
# differently: by a mean of 1.0 and at most 4 levels on these images before any resize).
_TOLERANCE = {"png": (0.3, 2), "jpg": (1.5, 6)}


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("size", [(300, 200), (160, 256)])
def test_preprocessing_matches_the_evaluation_pipeline(tmp_path, size, fmt):
    """predict's NumPy/PIL preprocessing against the training code's evaluation transform
    (TensorFlow) on the same file."""
    import ml_collections
    import tensorflow as tf

    from vim_jax.data import augment

    path = _photo(tmp_path / f"x.{fmt}", size)
    cfg = ml_collections.ConfigDict(dict(image_size=96, eval_crop_ratio=0.875, mean=predict.MEAN,
                                         std=predict.STD))
    want, valid = augment.eval_transform(tf.io.read_file(str(path)), cfg)
    got = predict.load_image(path, 96, 0.875)
    levels = np.abs(got - want.numpy()) * np.asarray(predict.STD) * 255
    assert bool(valid) and got.shape == (96, 96, 3)
    mean, worst = _TOLERANCE[fmt]
    assert levels.mean() < mean and levels.max() <= worst + 1e-3, (levels.mean(), levels.max())


def test_classes_and_features_from_the_command_line(tmp_path, capsys):
    weights = str(fixture_path("vim_tiny_d4.pth"))  # official format, 10 classes
    files = [str(_photo(tmp_path / f"{i}.jpg", seed=i)) for i in range(3)]
    predict.main(files + ["--model", "vim_tiny_patch16_224", "--pretrained", weights,
                          "--img-size", "64", "--top", "3", "--batch", "2"])
    out = capsys.readouterr().out
    model = vim_jax.create_model("vim_tiny_patch16_224", pretrained=weights, img_size=64)
    x = np.stack([predict.load_image(f, 64) for f in files])
    probs = np.asarray(jax.nn.softmax(model(x), axis=-1))
    for f, p in zip(files, probs):
        k = int(np.argmax(p))
        assert f"{p[k]:7.2%}  {k:4d}  class {k}" in out.split(f)[1], out
    predict.main(files + ["--model", "vim_tiny_patch16_224", "--pretrained", weights,
                          "--img-size", "64", "--features", str(tmp_path / "f.npz")])
    saved = np.load(tmp_path / "f.npz")
    np.testing.assert_allclose(saved["features"], model.forward_features(x), atol=1e-5)
    assert list(saved["files"]) == files


def test_imagenet_names_and_missing_files():
    names = predict.class_names(1000)
    assert names[0] == "tench" and len(names) == 1000 and predict.class_names(10) is None
    with pytest.raises(SystemExit, match="no such image file: nope.jpg"):
        predict.main(["nope.jpg", "--model", "vim_tiny_patch16_224"])
