"""ViG through the same tools as Vim: training and evaluation of a workdir, loading it by
path, fine-tuning it with a new head, prediction and export (jax.export and ONNX)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("tensorflow_datasets")

from conftest import tiny_config, write_image_folder  # noqa: E402
from vim_jax import create_model  # noqa: E402
from vim_jax.train.evaluation import evaluate_workdir  # noqa: E402
from vim_jax.train.loop import train_and_evaluate  # noqa: E402


def vig_config(data, **over):
    """tiny_config with a one-block ViG (width 32, one head) at 32 px: a 2x2 token grid."""
    c = tiny_config(data, **{"optim__epochs": 4, "optim__base_lr": 0.3, "data__image_size": 32, **over})
    c.model.name = "vig_tiny_patch16_224"
    c.model.remat = "none"
    c.model.overrides = dict(embed_dim=32, num_heads=1, depth=1)
    c.optim.decay_rule = "mmseg"
    return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=8)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vig_run")
    return workdir, train_and_evaluate(vig_config(data), str(workdir))


def test_training_evaluation_and_loading_a_workdir(trained):
    workdir, metrics = trained
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert metrics["step"] == 12 and losses[-1] < 0.8 * losses[0], losses
    assert json.loads((workdir / "model.json").read_text())["name"] == "vig_tiny_patch16_224"
    again = evaluate_workdir(str(workdir))  # what eval.py runs
    assert again["top1"] == metrics["eval"]["top1"]
    assert again["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)
    model = create_model(pretrained=str(workdir))
    assert (model.depth, model.embed_dim, model.num_classes) == (1, 32, 3)


def test_hierarchical_vig_trains_through_the_same_loop(data, tmp_path):
    """ViG-H (one one-block stage, bfloat16 as its recipe) through train_and_evaluate."""
    c = vig_config(data, model__dtype="bfloat16", optim__epochs=2)
    c.model.name = "vig_h_tiny_224"
    c.model.overrides = dict(dims=16, depths=(1,), num_heads=(1,))
    metrics = train_and_evaluate(c, str(tmp_path / "h"))
    assert metrics["step"] == 6 and metrics["nonfinite_steps"] == 0
    assert create_model(pretrained=str(tmp_path / "h")).depths == (1,)


def test_fine_tuning_a_vig_workdir_with_a_new_head(data, trained):
    from vim_jax.train.config import build_model

    workdir, _ = trained
    config = vig_config(data, model__pretrained=str(workdir), model__reset_head=True)
    model = build_model(config, 5)
    assert model.head.kernel.shape == (32, 5)
    got, want = nnx.state(model, nnx.Param), nnx.state(create_model(pretrained=str(workdir)), nnx.Param)
    got.pop("head"), want.pop("head")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_and_export_a_vig_workdir(data, trained, tmp_path, capsys):
    from vim_jax import export, load_exported, predict

    workdir, _ = trained
    image = next((data / "val").glob("*/*"))
    predict.main([str(image), "--pretrained", str(workdir), "--top", "2"])
    out = capsys.readouterr().out
    assert image.name in out and "class_" in out
    model = create_model(pretrained=str(workdir))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    export.main([str(tmp_path / "vig.jaxexport"), "--pretrained", str(workdir), "--batch", "2",
                 "--img-size", "32", "--model", "vig_tiny_patch16_224"])
    np.testing.assert_allclose(load_exported(tmp_path / "vig.jaxexport")(x), model(x), atol=1e-5)
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    export.main([str(tmp_path / "vig.onnx"), "--format", "onnx", "--pretrained", str(workdir),
                 "--batch", "2", "--img-size", "32", "--model", "vig_tiny_patch16_224"])
    session = export.onnx_session(tmp_path / "vig.onnx", threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model(x), atol=1e-4)
