"""safetensors weights: official names (the official code's state dict) and this project's,
single files and Hugging Face-style directories, through create_model and the converter."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import fixture_path
from vim_jax import create_model
from vim_jax.weights.formats import load_state_dict, save_safetensors


def _images(vim_io):
    return vim_io["input_nchw"].transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def weights_model(vim_weights_path):
    return create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path))


def _assert_same_params(a, b):
    from flax import nnx

    pa, pb = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (a, b))
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)}
    fa, fb = flat(pa), flat(pb)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_official_names_from_the_fixture_give_its_logits(tmp_path, vim_io):
    """The official-format .pth re-saved as safetensors by the converter: the same keys and
    shapes as the official state dict (what the official model loads), the fixture's logits."""
    pth = fixture_path("vim_tiny_d4.pth")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "vim_jax.convert", str(pth), str(out), "--to",
                           "safetensors"], capture_output=True, text=True, check=True)
    assert "[safetensors]" in proc.stdout
    official = load_state_dict(pth)
    written = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in official.items()}
    for k in official:
        np.testing.assert_array_equal(written[k], official[k], err_msg=k)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vim_tiny_patch16_224" and config["model_args"]["depth"] == 4
    model = create_model(pretrained=str(out))  # the directory by path: name and arguments from it
    np.testing.assert_allclose(model(_images(vim_io)), vim_io["logits"], atol=1e-4)
    _assert_same_params(create_model("vim_tiny_patch16_224", pretrained=str(out / "model.safetensors")),
                        model)


@pytest.mark.parametrize("names", ["official", "vim_jax"])
def test_round_trip_under_both_names(tmp_path, weights_model, names):
    model = weights_model
    path = save_safetensors(model, tmp_path / "w.safetensors", names=names)
    keys = set(load_file(path))
    assert ("layers.0.mixer.A_b_log" in keys) == (names == "official")
    assert ("layers.mixer.A_log_b" in keys) == (names == "vim_jax")
    _assert_same_params(create_model("vim_tiny_patch16_224", pretrained=str(path)), model)


def test_converter_writes_own_names_into_a_directory(tmp_path, vim_weights_path, weights_model):
    out = tmp_path / "own"
    subprocess.run([sys.executable, "-m", "vim_jax.convert", str(vim_weights_path), str(out), "--to",
                    "safetensors", "--names", "vim_jax"], capture_output=True, text=True, check=True)
    assert "patch_embed.kernel" in load_file(out / "model.safetensors")
    _assert_same_params(create_model(pretrained=str(out)), weights_model)


def test_bad_safetensors_files_are_named(tmp_path, vim_weights_path):
    """A missing key is listed (either naming scheme); a file of another model is refused by
    name; a cut-off file is named and called so; a bad naming scheme lists the allowed ones."""
    sd = load_state_dict(vim_weights_path)
    del sd["layers.1.mixer.D_b"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing key 'layers.1.mixer.D_b'"):
        create_model("vim_tiny_patch16_224", pretrained=str(tmp_path / "missing.safetensors"))
    own = tmp_path / "own.safetensors"
    save_safetensors(create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path)), own,
                     names="vim_jax")
    with pytest.raises(ValueError, match="holds a 'vim_tiny_patch16_224', not a 'vim_small"):
        create_model("vim_small_patch16_224", pretrained=str(own))  # the name in its metadata
    tensors = load_file(own)
    del tensors["layers.mixer.D_b"]
    save_file(tensors, str(own))
    with pytest.raises(ValueError, match=r"missing key \"\['layers'\]\['mixer'\]\['D_b'\]"):
        create_model("vim_tiny_patch16_224", pretrained=str(own))
    full = tmp_path / "full.safetensors"
    save_file(load_state_dict(vim_weights_path), str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        create_model("vim_tiny_patch16_224", pretrained=str(cut))
    with pytest.raises(ValueError, match="names='torch' is not one of"):
        save_safetensors(None, full, names="torch")
