"""ONNX export (python -m vim_jax.export --format onnx): one file, batch dynamic, run by
ONNX Runtime within 1e-4 of JAX; the model's export mode holds standard operations only."""

import os

import jax
import numpy as np
import pytest

from conftest import fixture_path
from vim_jax import create_model, export


def _require(module):
    """The onnx extra's modules; CI installs the extra, so there a missing one fails."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module, reason="the onnx extra: pip install -e '.[onnx]'")


def test_export_runs_in_onnx_runtime_at_two_batch_sizes(tmp_path, capsys):
    """The official-format fixture (depth 4, 10 classes) at 32 px through the command."""
    _require("jax2onnx")
    _require("onnxruntime")
    out = tmp_path / "vim.onnx"
    weights = str(fixture_path("vim_tiny_d4.pth"))
    export.main([str(out), "--format", "onnx", "--model", "vim_tiny_patch16_224", "--pretrained",
                 weights, "--batch", "2", "--img-size", "32"])
    assert "batch dynamic" in capsys.readouterr().out
    model = create_model("vim_tiny_patch16_224", pretrained=weights, img_size=32)
    session = export.onnx_session(out, threads=1)
    batch_dim = session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str), f"batch dimension is fixed at {batch_dim}"
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 32, 32, 3)).astype(np.float32)
        got = session.run(["logits"], {"images": x})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, model(x), atol=1e-4, rtol=0)


def test_export_mode_traces_standard_operations_with_the_same_logits():
    """No platform choice, no reverse scan, no CPU-only trick in the traced program; the
    model is back in its own mode afterwards."""
    model = create_model("vim_tiny_patch16_224", depth=2, img_size=32, num_classes=5)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    want = model(x)
    trace = lambda: str(jax.make_jaxpr(lambda im: model(im))(x))
    with export.export_mode(model):
        text = trace()
        np.testing.assert_allclose(model(x), want, atol=1e-5, rtol=1e-5)
    assert "platform_index" not in text and "reverse=True" not in text
    assert "bitcast_convert_type" not in text  # the CPU's polynomial exp
    assert model.portable is False and model.layers.mixer.portable is False
    assert "platform_index" in trace()


def test_onnx_platform_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        export.main(["x.onnx", "--format", "onnx", "--model", "vim_tiny_patch16_224",
                     "--platforms", "cpu"])
    assert "--platforms applies to --format jax" in capsys.readouterr().err
