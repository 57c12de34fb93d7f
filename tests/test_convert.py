"""Converter CLI, checkpoint directories and clear errors on mismatched checkpoints."""

import subprocess
import sys

import numpy as np
import pytest

from vim_jax import create_model
from vim_jax.weights.names import CheckpointMismatch, params_to_state_dict
from vim_jax.weights.formats import load_state_dict


def test_cli_converts_and_directory_reloads(tmp_path, vim_weights_path, vim_io):
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "vim_jax.convert", str(vim_weights_path), str(out)],
                          capture_output=True, text=True, check=True)
    assert "converted" in proc.stdout and (out / "model.json").exists()
    assert (out / "checkpoints" / "0" / "params").is_dir()
    model = create_model(pretrained=str(out))          # name read from the directory
    x = vim_io["input_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(model(x), vim_io["logits"], atol=1e-4)
    # Overrides still win over the saved config (here: a larger grid, pos_embed resized).
    big = create_model(pretrained=str(out), img_size=96)
    assert big.pos_embed.shape == (1, 37, 192)


def test_round_trip_to_official_layout(vim_weights_path):
    sd = load_state_dict(vim_weights_path)
    model = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path))
    from flax import nnx
    back = params_to_state_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cls_position="middle")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_mismatches_name_keys_and_shapes(tmp_path, vim_weights_path):
    sd = load_state_dict(vim_weights_path)
    bad = dict(sd)
    del bad["layers.2.mixer.D_b"]
    bad["layers.0.mixer.bogus"] = np.zeros(3, np.float32)
    bad["layers.1.mixer.x_proj.weight"] = np.zeros((40, 384), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(CheckpointMismatch) as e:
        create_model("vim_tiny_patch16_224", pretrained=str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} does not fit the model: 1 missing, 1 unexpected and 1 "
                          "mis-shaped keys:"), msg
    assert "missing key 'layers.2.mixer.D_b'" in msg
    assert "unexpected key 'layers.0.mixer.bogus'" in msg
    assert "'layers.1.mixer.x_proj.weight': checkpoint (40, 384), model expects (44, 384)" in msg
    # A Ti checkpoint into a Small model: every width mismatch is counted, a screenful listed.
    with pytest.raises(CheckpointMismatch, match="0 missing, 0 unexpected and 74 mis-shaped") as e:
        create_model("vim_small_patch16_224", pretrained=str(vim_weights_path))
    lines = str(e.value).splitlines()  # a screenful: the counts, 20 keys, how many more
    assert len(lines) == 22 and lines[-1].strip().startswith("... and ") and "mis-shaped" in lines[0]


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("vim_tiny_patch16_224", pretrained=str(tmp_path / "nope.pth"))
    (tmp_path / "x.ckpt").write_text("hi")
    with pytest.raises(ValueError, match="unknown format '.ckpt'"):
        create_model("vim_tiny_patch16_224", pretrained=str(tmp_path / "x.ckpt"))
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vim-jax checkpoint directory: no model.json"):
        create_model(pretrained=str(tmp_path / "partial"))
    with pytest.raises(ValueError, match="step= applies to checkpoint directories"):
        create_model("vim_tiny_patch16_224", pretrained=str(tmp_path / "x.ckpt"), step=3)
    with pytest.raises(ValueError, match="ema=True picks the model_ema of a .pth"):
        create_model("vim_tiny_patch16_224", pretrained=str(tmp_path / "x.ckpt"), ema=True)
