"""python -m vim_jax.export and vim_jax.load_exported: an artifact that runs without the
model code and reproduces the model's logits."""

import numpy as np

from conftest import fixture_path
import vim_jax
from vim_jax import export


def test_export_command_and_load_exported(tmp_path, capsys):
    """The official-format fixture (depth 4, 10 classes) exported at 32 px, batch 2, for
    the CPU and CUDA; the loaded artifact's CPU half gives the model's logits."""
    out = tmp_path / "vim.jaxexport"
    weights = str(fixture_path("vim_tiny_d4.pth"))
    export.main([str(out), "--model", "vim_tiny_patch16_224", "--pretrained", weights,
                 "--batch", "2", "--img-size", "32", "--platforms", "cpu,cuda"])
    assert "platforms cpu,cuda" in capsys.readouterr().out
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    want = vim_jax.create_model("vim_tiny_patch16_224", pretrained=weights, img_size=32)(x)
    got = vim_jax.load_exported(out)(x)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_platform_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown platform.*'gpu'"):
        export.export_model(None, batch=1, img_size=32, platforms=("gpu",))


def test_module_command_prints_no_runpy_warning():
    """``import vim_jax`` does not import vim_jax.export, so runpy does not warn that the
    module it is about to run was imported already."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vim_jax.export", "--help"], capture_output=True,
                          text=True, check=True)
    assert "--format" in proc.stdout and "RuntimeWarning" not in proc.stderr, proc.stderr
