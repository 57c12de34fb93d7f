"""Both families through every command: conversion and export take the model from the
weights (an official state dict's keys, or a directory's saved name), and a user's mistake
ends a command with one line that says what to do."""

import json

import numpy as np
import pytest

from conftest import fixture_path
from vim_jax import convert, export, load_exported
from vim_jax.weights.create import create_model

# Each family's official-format fixture, its input/output file, and the variant its keys show.
FAMILIES = {"vim": ("vim_tiny_d4.pth", "vim_tiny_d4_io.npz", "vim_tiny_patch16_224"),
            "vig": ("vig/vig_tiny_d2.pth", "vig/vig_tiny_d2_io.npz", "vig_tiny_patch16_224"),
            "vig_h": ("vig/vig_h_tiny_small.pth", "vig/vig_h_tiny_small_io.npz", "vig_h_tiny_224")}


def _io(family):
    io = np.load(fixture_path(FAMILIES[family][1]))
    return io["input_nchw"].transpose(0, 2, 3, 1), io["logits"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_and_export_need_no_model_name(family, tmp_path, capsys):
    pth, _, name = FAMILIES[family]
    out = tmp_path / "hf"
    convert.main([str(fixture_path(pth)), str(out), "--to", "safetensors"])
    assert json.loads((out / "config.json").read_text())["architecture"] == name
    x, want = _io(family)
    back = create_model(pretrained=str(out))
    np.testing.assert_allclose(np.asarray(back(x)), want, atol=1e-4)
    ckpt = tmp_path / "ckpt"
    convert.main([str(fixture_path(pth)), str(ckpt)])
    artifact = tmp_path / "model.jaxexport"
    export.main(["--pretrained", str(ckpt), "--img-size", str(x.shape[1]), "--batch", str(x.shape[0]),
                 str(artifact)])
    assert f": {name}, batch {x.shape[0]}" in capsys.readouterr().out
    np.testing.assert_allclose(np.asarray(load_exported(artifact)(x)), want, atol=1e-4)


def _one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_command_errors_are_one_line_that_says_what_to_do(tmp_path, capsys):
    odd = tmp_path / "odd.npz"
    np.savez(odd, **{"encoder.weight": np.zeros((3, 3), np.float32)})
    err = _one_line_error(convert.main, [str(odd), str(tmp_path / "o")], capsys)
    assert err.startswith("python -m vim_jax.convert: error: ") and "pass the model's name (one of list_models())" in err
    # The wrong family named: the mismatch's counts and its first key, on one line.
    err = _one_line_error(convert.main, [str(fixture_path("vig/vig_h_tiny_small.pth")), str(tmp_path / "o"),
                                         "--model", "vig_tiny_patch16_224"], capsys)
    assert "does not fit the model" in err and "(first: " in err
    err = _one_line_error(convert.main, [str(tmp_path / "nope.pth"), str(tmp_path / "o")], capsys)
    assert "does not exist" in err
    err = _one_line_error(export.main, ["--pretrained", str(tmp_path / "nope"), str(tmp_path / "x")], capsys)
    assert "nope" in err
    err = _one_line_error(export.main, [str(tmp_path / "x")], capsys)
    assert "--model is needed unless --pretrained is a file or directory of weights" in err


def test_predict_takes_the_model_from_an_official_vig_h_file(tmp_path, capsys):
    from PIL import Image

    from vim_jax import predict

    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(image)
    predict.main([str(image), "--pretrained", str(fixture_path(FAMILIES["vig_h"][0])), "--img-size", "64",
                  "--top", "2"])
    out = capsys.readouterr().out
    assert str(image) in out and out.count("%") >= 2, out
