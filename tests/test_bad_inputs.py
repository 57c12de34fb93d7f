"""Bad inputs a new user meets in the first week: each is a clear error naming the value and
what is allowed, or a skip that says so; never a deep traceback or a silent wrong answer.
(Checkpoint files: test_pth.py, test_convert.py, test_safetensors.py; workdirs, Ctrl-C and
metrics.json: test_train.py.)"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from vim_jax import create_model, export, predict
from vim_jax.models.deit import create_deit
from vim_jax.train.config import TrainingError, check_choices


@pytest.fixture(scope="module")
def models():
    return (create_model("vim_tiny_patch16_224", depth=1, img_size=32, num_classes=3),
            create_deit("deit_tiny_patch16_224", depth=1, img_size=32, num_classes=3))


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 3, 32, 32), np.float32), r"NHWC \(batch, H, W, 3\).*got shape \(2, 3, 32, 32\).*"
                                          r"looks like NCHW: pass images.transpose\(0, 2, 3, 1\)"),
    (np.zeros((32, 32, 3), np.float32), r"got one image of shape \(32, 32, 3\): add a batch axis"),
    (np.zeros((0, 32, 32, 3), np.float32), r"non-empty batch.*got shape \(0, 32, 32, 3\)"),
    (np.zeros((2, 32, 32, 1), np.float32), r"got shape \(2, 32, 32, 1\) \(1 channels\)"),
    (np.zeros((2, 32, 32, 3), np.uint8), r"must be float .*normalised.*got dtype uint8"),
])
def test_model_inputs_name_the_shape_expected_and_given(models, images, message):
    for model in models:
        with pytest.raises(ValueError, match=message):
            model(images)


def test_config_values_with_choices_list_them():
    import ml_collections

    config = ml_collections.ConfigDict({"model": {"dtype": "bf16", "mixer_backend": "auto",
                                                  "remat": "mixer", "name": "vig_tiny_patch16_224"}})
    with pytest.raises(TrainingError, match=r"model.dtype='bf16' is not one of \('float32', 'bfloat16'\)"):
        check_choices(config)
    config.model.dtype, config.model.remat = "bfloat16", "some"
    with pytest.raises(TrainingError, match=r"model.remat='some' is not one of \('mixer'"):
        check_choices(config)
    # The mixer's backend: each family's own choices, named with the argument it sets.
    config.model.remat, config.model.mixer_backend = "full", "portable"
    with pytest.raises(TrainingError, match=r"model.mixer_backend='portable' is not one of \('auto', "
                       r"'reference', 'chunked', 'pallas'\) \(the gla_backend of vig_tiny_patch16_224\)"):
        check_choices(config)
    config.model.name = "vim_tiny_patch16_224"
    check_choices(config)  # "portable" is one of Vim's scan backends


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "argument --batch: 0 must be > 0"),
    (["--crop-ratio", "0"], "argument --crop-ratio: 0 must be > 0"),
    (["--crop-ratio", "1.5"], "argument --crop-ratio: 1.5 must be in (0, 1]"),
    (["--img-size", "-224"], "argument --img-size: -224 must be > 0"),
    (["--top", "x"], "argument --top: 'x' is not a number"),
])
def test_predict_numbers_are_argument_errors(tmp_path, capsys, argv, message):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--model", "vim_tiny_patch16_224", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_export_numbers_are_argument_errors(capsys):
    for flag in ("--batch", "--img-size"):
        with pytest.raises(SystemExit):
            export.main(["x.jaxexport", "--model", "vim_tiny_patch16_224", flag, "0"])
        assert f"argument {flag}: 0 must be > 0" in capsys.readouterr().err


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    """A mid-grey 16-bit PNG reads as mid-grey (PIL alone clips it to white)."""
    grey16 = np.full((40, 40), 30000, np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    Image.fromarray(np.full((40, 40), round(30000 * 255 / 65535), np.uint8)).save(tmp_path / "g8.png")
    np.testing.assert_allclose(predict.load_image(tmp_path / "g16.png", 32),
                               predict.load_image(tmp_path / "g8.png", 32), atol=1e-6)


def test_a_segmentation_workdir_is_refused_by_predict(tmp_path):
    (tmp_path / "config.json").write_text('{"task": "segmentation", "data": {}}')
    with pytest.raises(SystemExit, match="is a segmentation run; python -m vim_jax.predict classifies"):
        predict.workdir_settings(tmp_path)


def test_an_unreadable_image_is_skipped_and_the_rest_predicted(tmp_path, capsys):
    from conftest import fixture_path

    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    predict.main([str(bad), str(good), "--model", "vim_tiny_patch16_224", "--pretrained",
                  str(fixture_path("vim_tiny_d4.pth")), "--img-size", "32"])
    out, err = capsys.readouterr()
    assert f"skipped {bad}: cannot read it as an image" in err
    assert str(good) in out and str(bad) not in out


def test_folders_refuse_empty_classes_and_list_only_decodable_types(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from conftest import write_image_folder
    from vim_jax.data import augment
    from vim_jax.data.sources import IMAGE_EXTENSIONS, DataError, make_source

    root = write_image_folder(tmp_path / "f", classes=2, per_class=2, splits=("train",))
    (root / "train" / "class_09").mkdir()
    (root / "train" / "class_09" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class directory .*class_09 holds no images .*notes.txt"):
        make_source("folder", str(root), "train")
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), (200, 30, 90), np.uint8)).save(buf, format="WEBP", lossless=True)
    # WebP is listed exactly where the pipeline decodes it, then decoded, not logged as corrupt.
    assert (".webp" in IMAGE_EXTENSIONS) == augment.DECODES_WEBP
    if augment.DECODES_WEBP:
        image, valid = augment.decode(buf.getvalue())
        assert bool(valid) and tuple(image.numpy()[1, 2]) == (200, 30, 90)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from conftest import tiny_config
    from vim_jax.train.setup import setup_run

    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(TrainingError, match=r"--workdir .*file is a file: pass a directory"):
        setup_run(tiny_config(tmp_path), str(path))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(TrainingError, match="is not writable"):
            setup_run(tiny_config(tmp_path), str(locked))
