"""Segmentation through the training loop: the official optimiser pieces, the step (loss,
BatchNorm statistics, 8 devices == 1), exact resume, evaluation equal to NumPy, eval.py."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("tensorflow_datasets")

from vim_jax.weights.checkpoints import Checkpoints  # noqa: E402
from vim_jax.weights.create import create_model  # noqa: E402
from vim_jax.train.optim import decay_mask, layer_lr_scales, lr_schedule  # noqa: E402
from vim_jax.train.segmentation import IGNORE, pixel_cross_entropy  # noqa: E402
from vim_jax.train.loop import TrainingError, train_and_evaluate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def segmenter():
    """A tiny UperNet-Vim (3 blocks, stride-8 neck), 5 classes, 32x32 inputs."""
    return create_model("upernet_vim_tiny", num_classes=5, img_size=32, patch_size=8, embed_dim=32,
                        depth=3, layers=(0, 1, 2, 2), channels=16, aux_channels=16,
                        drop_path_rate=0.1)


# ----------------------------------------------------------------------------- the optimiser

def test_layer_decay_scales_are_the_official_ones(segmenter):
    """mmseg LayerDecayOptimizerConstructor with num_layers = depth + 2, scale = rate **
    (depth + 1 - layer): embeddings layer 0; blocks, found by the name backbone.blocks.<i>
    that Vim's blocks do not have, fall with everything else into the last layer (scale 1)
    as in the official runs; blocks=True gives block i layer i + 1 as BEiT intends."""
    params = nnx.state(segmenter, nnx.Param)
    for blocks, per_block in ((False, [1.0] * 3), (True, [0.9 ** 3, 0.9 ** 2, 0.9])):
        scales = _leaves(layer_lr_scales(params, 3, 0.9, blocks=blocks))
        assert np.isclose(scales["backbone.pos_embed.value"], 0.9 ** 4)
        assert np.isclose(scales["backbone.patch_embed.kernel.value"], 0.9 ** 4)
        np.testing.assert_allclose(
            np.broadcast_to(scales["backbone.layers.mixer.in_proj.kernel.value"], (3, 1, 1)).ravel(),
            per_block, rtol=1e-6)
        for name in ("backbone.norm_f.weight.value", "decode.classifier.kernel.value",
                     "neck.up8.kernel.value", "aux.conv.conv.kernel.value"):
            assert scales[name] == 1.0, name


def test_layer_decay_scales_the_adamw_update(segmenter):
    """make_optimizer: each parameter's whole AdamW update (weight decay included) is
    multiplied by its scale."""
    import ml_collections
    import optax
    from vim_jax.train.optim import make_optimizer

    params = nnx.state(segmenter, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=0.0,
                                         decay_rule="mmseg", layer_decay=0.0))
    def first_update():
        tx = make_optimizer(cfg, params, optax.constant_schedule(1e-3), depth=3)
        return _leaves(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params))

    plain = first_update()
    cfg.layer_decay, cfg.layer_decay_blocks = 0.9, True
    scaled = first_update()
    scales = _leaves(layer_lr_scales(params, 3, 0.9, blocks=True))
    for name in plain:
        np.testing.assert_allclose(scaled[name], plain[name] * scales[name], rtol=1e-6, err_msg=name)


def test_mmseg_decay_rule_spares_biases_and_one_dimensional_parameters(segmenter):
    model = segmenter
    mask = _leaves(decay_mask(nnx.state(model, nnx.Param), "mmseg"))
    params = _leaves(nnx.state(model, nnx.Param))
    for name, decays in mask.items():
        per_block = params[name].ndim - (".layers." in name)
        assert bool(decays) == (per_block > 1 and not name.endswith("bias.value")), name
    assert mask["backbone.layers.mixer.A_log.value"] and mask["backbone.pos_embed.value"]
    assert not mask["backbone.layers.mixer.D.value"]
    with pytest.raises(ValueError, match="decay_rule='bogus'"):
        decay_mask(nnx.state(model, nnx.Param), "bogus")


def test_poly_schedule_is_mmcvs():
    """mmcv: lr = (base - min)(1 - k/T)^p + min, times 1 - (1 - k/W)(1 - ratio) in warm-up."""
    base, ratio, warm, total = 1e-4, 1e-6, 10, 100
    s = lr_schedule(peak_lr=base, warmup_lr=base * ratio, min_lr=0.0, warmup_steps=warm,
                    total_steps=total, kind="poly")
    for k in (0, 1, 5, 9, 10, 50, 99, 100):
        regular = base * (1 - k / total)
        want = regular * (1 - (1 - k / warm) * (1 - ratio)) if k < warm else regular
        assert np.isclose(float(s(k)), want, rtol=1e-5, atol=1e-12), k
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_schedule(peak_lr=1, warmup_lr=0, min_lr=0, warmup_steps=0, total_steps=1, kind="step")


def test_class_weighted_pixel_loss_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4, 5))
    labels[0, 0, :3] = IGNORE
    w = np.array([1.0, 5.0, 2.0], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != IGNORE
    safe = np.where(valid, labels, 0)
    ce = -np.take_along_axis(logp, safe[..., None], -1)[..., 0] * w[safe]
    want = np.where(valid, ce, 0).sum() / labels.size  # mmseg: divided by every pixel
    got = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weight=w)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


# ----------------------------------------------------------------------------- the step

_DP_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vim_jax import create_model
    from vim_jax.parallel import sharding as shd
    from vim_jax.train.step import StepOptions, TrainState, train_step_fn

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(1)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 5, (16, 32, 32)).astype(np.int32)
    labels[:, :4] = 255

    def run(devices):
        model = create_model("upernet_vim_tiny", num_classes=5, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, layers=(0, 1, 1, 1), channels=16,
                             aux_channels=16, drop_path_rate=0.1)
        model.train()
        # SGD, not Adam: a bias right before a BatchNorm (the neck's) has a gradient that is
        # zero up to roundoff, which Adam would turn into full-size steps of random sign.
        step, state = train_step_fn(model, optax.sgd(0.05),
                                    StepOptions(task="segmentation", class_weight=(1., 2., 1., 1., 3.)))
        mesh = shd.make_mesh(devices)
        sh = TrainState(NamedSharding(mesh, P()), *(shd.state_shardings(t, mesh, False) for t in state[1:]))
        state = shd.put_global(state, sh)
        bs = shd.batch_sharding(mesh)
        f = shd.jit_on_mesh(mesh, step, in_shardings=(sh, bs, bs), out_shardings=(sh, None))
        for _ in range(2):
            state, m = f(state, jax.device_put(images, bs), jax.device_put(labels, bs))
        return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))], float(m["loss"])

    ref, loss1 = run(jax.devices()[:1])
    got, loss8 = run(jax.devices())
    # atol: the neck's transposed-conv biases feed BatchNorms, so their gradients are zero
    # up to roundoff and they stay ~1e-9; every real update is orders of magnitude larger.
    bad = [i for i, (a, b) in enumerate(zip(ref, got)) if not np.allclose(b, a, rtol=1e-5, atol=1e-7)]
    print(json.dumps(dict(bad=bad, dloss=abs(loss1 - loss8), leaves=len(ref))))
""")


@pytest.mark.slow  # CI budget: about 40 s on the 2-core CI machine, as the classification one
def test_eight_device_segmentation_step_equals_one_device_step():
    """Data parallel over 8 simulated CPU devices == 1 device for a UperNet step: the loss,
    params and BatchNorm statistics (over the global batch, like SyncBN)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _DP_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["dloss"] < 1e-5 and out["leaves"] > 50, out


# ----------------------------------------------------------------------------- the loop

def _seg_config(data_dir):
    from configs.digits_seg import get_config

    c = get_config()
    c.data.data_dir = str(data_dir)
    c.data.image_size = 48  # the canvases at their own size: 3x3 patches of 16
    c.data.resize_scale = c.data.eval_size = (48, 48)
    c.model.overrides.embed_dim = 32
    c.model.overrides.depth = 2
    c.model.overrides.layers = (0, 1, 1, 1)
    c.model.overrides.channels = 16
    c.model.overrides.aux_channels = 16
    c.optim.batch_size = 8
    c.train.num_steps = 6
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 3
    c.train.eval_batch_size = 100
    c.seg.plot_images = 3
    return c


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def seg_trained(seg_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seg_run")
    return workdir, train_and_evaluate(_seg_config(seg_data), str(workdir))


def _restore(workdir):
    from vim_jax.train.config import build_model, load_config

    model = build_model(load_config(workdir), 11)
    return model, Checkpoints(str(workdir)).restore_params(
        nnx.state(model, nnx.Param), ema=False, batch_stats=nnx.state(model, nnx.BatchStat))


def test_segmentation_run_trains_and_evaluates(seg_trained):
    workdir, metrics = seg_trained
    assert metrics["step"] == 6 and len(metrics["loss_history"]) == 6
    ev = metrics["eval"]
    assert ev["count"] == 600 and len(ev["iou"]) == 11 and 0 < ev["miou"] < 100
    assert ev["pixels"] == 600 * 48 * 48
    assert set(metrics["eval_history"][-1]) == {"step", "eval_miou", "eval_pixel_acc", "eval_loss"}
    assert "batch_stats" in os.listdir(workdir / "checkpoints" / "6")
    # BatchNorm running averages moved from their initial 0 / 1 and were checkpointed
    _, (_, _, stats) = _restore(workdir)
    stats = _leaves(stats)
    assert all(np.abs(v).max() > 0 for k, v in stats.items() if k.endswith("mean.value"))
    assert all(not np.allclose(v, 1.0) for k, v in stats.items() if k.endswith("var.value"))


@pytest.mark.slow  # CI budget: about 15 s (the training run test above stays in CI)
def test_segmentation_eval_equals_numpy_confusion(seg_data, seg_trained):
    """The run's final mIoU, pixel accuracy and loss equal a NumPy evaluation of the trained
    segmenter, loaded with create_model(pretrained=workdir), called directly on each held-out
    canvas (other batches, no mesh, no eval step)."""
    from vim_jax.data.pipeline import eval_batches
    from vim_jax.data.sources import make_source
    from vim_jax.train.config import load_config

    workdir, metrics = seg_trained
    model = create_model(pretrained=str(workdir))
    assert type(model).__name__ == "VimUperNet" and model.num_classes == 11
    config = load_config(workdir)
    source = make_source("digits_seg", str(seg_data), "test")
    forward = nnx.jit(lambda m, x: m(x))
    cm, loss, pixels = np.zeros((11, 11), np.int64), 0.0, 0
    for batch in eval_batches(source, config.data, local_batch=64):
        keep = batch["mask"] > 0
        logits = np.asarray(forward(model, jnp.asarray(batch["image"][keep])), np.float64)
        labels = batch["label"][keep]
        pred = logits.argmax(-1)
        np.add.at(cm, (labels.ravel(), pred.ravel()), 1)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        loss -= np.take_along_axis(logp, labels[..., None], -1).sum()
        pixels += labels.size
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    ev = metrics["eval"]
    np.testing.assert_allclose(ev["miou"], 100 * np.nanmean(iou), rtol=1e-4)  # argmax ties aside
    np.testing.assert_allclose(ev["pixel_acc"], 100 * np.trace(cm) / cm.sum(), rtol=1e-4)
    np.testing.assert_allclose(ev["loss"], loss / pixels, rtol=1e-4)


@pytest.mark.slow  # CI budget: about 40 s; classification's exact resume runs in CI (the same loop)
def test_segmentation_resume_is_exact(seg_data, seg_trained, tmp_path):
    """A run resumed from step 3 of the uninterrupted run (its params, optimiser state and
    BatchNorm statistics, and the data stream rebuilt from the step) ends bit-identical to
    it. (SIGTERM's save is the classification test's: the same loop.)"""
    import shutil

    workdir = tmp_path / "resumed"
    shutil.copytree(seg_trained[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    assert Checkpoints(str(workdir)).steps()[-1] == 3
    metrics = train_and_evaluate(_seg_config(seg_data), str(workdir))
    _, (sa, pa, ba) = _restore(seg_trained[0])
    _, (sb, pb, bb) = _restore(workdir)
    assert sa == sb == 6
    for a, b in zip(jax.tree.leaves((pa, ba)), jax.tree.leaves((pb, bb))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics["eval"]["miou"] == seg_trained[1]["eval"]["miou"]
    # metrics.json keeps the whole run: steps 1-3 from the first call, 4-6 from the resumed one.
    assert [h["loss"] for h in metrics["loss_history"]] == [h["loss"] for h in seg_trained[1]["loss_history"]]


@pytest.mark.slow  # CI budget: about 25 s (the training run test above stays in CI)
def test_eval_cli_on_a_segmentation_run_writes_metrics_and_a_picture(seg_trained):
    workdir, metrics = seg_trained
    r = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mIoU" in r.stdout and "per-class IoU" in r.stdout
    out = json.loads((workdir / "eval_step6.json").read_text())
    assert out["miou"] == metrics["eval"]["miou"] and out["task"] == "segmentation"
    from PIL import Image

    picture = Image.open(workdir / "eval_step6.png")
    assert picture.width >= 3 * 144 and picture.height >= 3 * 144


def test_vig_h_segmenter_trains_through_the_same_loop(seg_data, tmp_path):
    """upernet_vig_h_tiny (configs/digits_seg_vig_h.py, smaller and on 32x32 canvases) through
    train_and_evaluate: it trains, evaluates on every held-out canvas, checkpoints its
    BatchNorm statistics, and its workdir loads back with create_model as the segmenter it
    trained."""
    from configs.digits_seg_vig_h import get_config
    from vim_jax.models.seg import ViGHUperNet

    c = get_config()
    c.data.data_dir = str(seg_data)
    c.data.image_size = 32  # ViG-H's stride: stage maps 8x8 to 1x1
    c.data.resize_scale = c.data.eval_size = (32, 32)
    c.model.overrides = dict(dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), channels=16,
                             aux_channels=16)
    c.optim.batch_size = 8
    c.train.num_steps = 4
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 4
    c.train.eval_batch_size = 100
    metrics = train_and_evaluate(c, str(tmp_path))
    assert metrics["step"] == 4 and all(np.isfinite(h["loss"]) for h in metrics["loss_history"])
    ev = metrics["eval"]
    assert ev["count"] == 600 and ev["pixels"] == 600 * 32 * 32 and 0 < ev["miou"] < 100
    model = create_model(pretrained=str(tmp_path))
    assert isinstance(model, ViGHUperNet) and model.num_classes == 11
    step, params, stats = Checkpoints(str(tmp_path)).restore_params(
        nnx.state(model, nnx.Param), ema=False, batch_stats=nnx.state(model, nnx.BatchStat))
    assert step == 4
    for a, b in zip(jax.tree.leaves((nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))),
                    jax.tree.leaves((params, stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # BatchNorm running averages moved from their initial 0 and were checkpointed
    assert all(np.abs(v).max() > 0 for k, v in _leaves(stats).items() if k.endswith("mean.value"))


def test_task_and_dataset_must_agree(seg_data, tmp_path):
    config = _seg_config(seg_data)
    config.task = "classification"
    config.data.mixup = 0.0
    with pytest.raises(TrainingError, match="digits_seg.*segmentation dataset but task='classification'"):
        train_and_evaluate(config, str(tmp_path / "a"))
    config = _seg_config(seg_data)
    config.data.mixup = 0.8
    with pytest.raises(TrainingError, match="segmentation takes no"):
        train_and_evaluate(config, str(tmp_path / "b"))


def test_ade20k_recipe_is_the_official_one():
    """configs/upernet_vim_tiny.py against hustvl/Vim seg/configs/vim/upernet/
    upernet_vim_tiny_24_512_slide_60k.py and its bases."""
    from configs import upernet_vim_tiny
    from vim_jax.train.setup import peak_lr

    c = upernet_vim_tiny.get_config()
    o, d = c.optim, c.data
    assert c.task == "segmentation" and c.model.num_classes == 150 and c.model.require_pretrained
    # lr and weight decay as seg/scripts/ft_vim_tiny_upernet.sh overrides the config's
    assert (o.batch_size, peak_lr(o), o.weight_decay, o.b1, o.b2) == (32, 2e-4, 0.1, 0.9, 0.999)
    assert (o.schedule, o.warmup_steps, o.min_lr, o.layer_decay, o.decay_rule) == ("poly", 1500, 0.0, 0.92, "mmseg")
    assert not o.layer_decay_blocks
    assert np.isclose(o.warmup_lr / peak_lr(o), 1e-6) and c.train.num_steps == 60_000
    assert (d.name, d.image_size, d.resize_scale, d.resize_ratio, d.cat_max_ratio) == (
        "ade20k", 512, (2048, 512), (0.5, 2.0), 0.75)
    assert d.hflip and d.photometric and d.reduce_zero_label
    assert (c.seg.eval_mode, c.seg.crop, c.seg.stride, c.seg.aux_weight) == ("slide", 512, 341, 0.4)
    assert (d.mixup, d.cutmix, d.label_smoothing, d.rand_augment, d.random_erasing) == (0, 0, 0, "", 0)


def test_vig_h_ade20k_config_is_mmsegs_swin_tiny_recipe():
    """configs/upernet_vig_h_tiny.py (hustvl/ViG has no segmentation recipe) against mmseg's
    upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K.py; the data,
    crops and test mode are the Vim segmenter's ADE20K ones."""
    from configs import upernet_vig_h_tiny
    from vim_jax.models.registry import SEG_VARIANTS
    from vim_jax.train.setup import peak_lr

    c = upernet_vig_h_tiny.get_config()
    o = c.optim
    assert c.model.name == "upernet_vig_h_tiny" and SEG_VARIANTS[c.model.name]["channels"] == 512
    assert c.model.require_pretrained and c.model.drop_path_rate == 0.3 and c.model.mixer_backend == "auto"
    assert (o.batch_size, peak_lr(o), o.weight_decay, o.b1, o.b2) == (16, 6e-5, 0.01, 0.9, 0.999)
    assert (o.schedule, o.warmup_steps, o.min_lr, o.layer_decay, o.decay_rule) == ("poly", 1500, 0.0, 0.0, "mmseg")
    assert np.isclose(o.warmup_lr / peak_lr(o), 1e-6) and c.train.num_steps == 160_000
    assert (c.data.name, c.data.image_size, c.seg.eval_mode, c.seg.aux_weight) == ("ade20k", 512, "slide", 0.4)


def test_seg_config_errors_name_the_bad_value(seg_data, tmp_path):
    config = _seg_config(seg_data)
    config.seg.class_weight = (1.0, 3.0)
    with pytest.raises(TrainingError, match="seg.class_weight has 2 weights but there are 11 classes"):
        train_and_evaluate(config, str(tmp_path / "a"))
    config = _seg_config(seg_data)
    config.model.reset_head = True
    with pytest.raises(TrainingError, match="reset_head applies to classifiers"):
        train_and_evaluate(config, str(tmp_path / "b"))


def test_a_checkpoint_without_batch_statistics_is_refused_not_moved_aside(tmp_path):
    """A classifier's checkpoint asked for a segmenter's BatchNorm statistics: an error
    naming the missing item; the step stays where it is (it is not corrupt)."""
    from vim_jax.weights.checkpoints import CheckpointError

    params = {"w": jnp.ones((3, 2))}
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save_params(5, params)
    ckpt.wait()
    with pytest.raises(CheckpointError, match="step 5 .* has no 'batch_stats' .*'ema', 'params'"):
        Checkpoints(str(tmp_path)).restore_params(params, ema=False, batch_stats={"mean": jnp.zeros(2)})
    assert (tmp_path / "checkpoints" / "5").is_dir()
    step, got = Checkpoints(str(tmp_path)).restore_params(params, ema=False)
    assert step == 5 and np.array_equal(got["w"], params["w"])
