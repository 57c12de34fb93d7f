"""train.py / eval.py machinery: learning, exact resume, data parallelism, bad inputs."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from conftest import tiny_config, write_image_folder  # noqa: E402
from vim_jax.weights.checkpoints import CheckpointError, Checkpoints  # noqa: E402
from vim_jax.train.evaluation import evaluate_workdir  # noqa: E402
from vim_jax.train.loop import TrainingError, train_and_evaluate, validate_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data, **over):
    # 24 training images, batch 8: 3 steps per epoch, 12 steps; lr high enough to move in 12.
    return tiny_config(data, **{"optim__epochs": 4, "optim__base_lr": 0.3, **over})


def _final_params(workdir):
    from flax import nnx
    from vim_jax.train.config import build_model, load_config

    config = load_config(workdir)
    model = build_model(config, 3)
    return Checkpoints(workdir).restore_params(nnx.state(model, nnx.Param), ema=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=8)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An uninterrupted run: (workdir, final metrics)."""
    workdir = tmp_path_factory.mktemp("run")
    return workdir, train_and_evaluate(_config(data), str(workdir))


def test_training_lowers_the_loss_and_writes_everything(trained):
    workdir, metrics = trained
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert metrics["step"] == 12 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert json.loads((workdir / "metrics.json").read_text())["eval"] == metrics["eval"]
    assert json.loads((workdir / "config.json").read_text())["optim"]["batch_size"] == 8
    assert list((workdir / "tensorboard").iterdir())
    assert Checkpoints(str(workdir)).steps()[-1] == 12
    assert metrics["nonfinite_steps"] == 0 and metrics["corrupt_images"] == 0


def test_kill_and_resume_gives_identical_parameters(data, trained, tmp_path):
    """SIGTERM mid-run saves a checkpoint; rerunning resumes with the same data order and
    randomness, and ends with bit-identical parameters."""
    workdir = tmp_path / "resumed"

    class KillAtStep6(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("step 6/"):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C; SIGTERM takes the same path

    logger = logging.getLogger("vim_jax.train.log")
    handler, level = KillAtStep6(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert train_and_evaluate(_config(data), str(workdir)) is None  # preempted
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert Checkpoints(str(workdir)).steps()[-1] == 6
    assert _strict_json(workdir / "metrics.json")["status"] == "preempted"
    metrics = train_and_evaluate(_config(data), str(workdir))
    step_a, params_a = _final_params(trained[0])
    step_b, params_b = _final_params(workdir)
    assert step_a == step_b == 12
    import jax
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics["eval"]["top1"] == trained[1]["eval"]["top1"]
    # metrics.json holds the whole run, the interrupted part included, as the uninterrupted
    # run's does; rerunning the finished command keeps it.
    assert metrics["loss_history"] == trained[1]["loss_history"]
    assert _strict_json(workdir / "metrics.json")["loss_history"] == trained[1]["loss_history"]
    again = train_and_evaluate(_config(data), str(workdir))
    assert again["loss_history"] == trained[1]["loss_history"]
    assert again["train_loss"] == trained[1]["train_loss"] and again["status"] == "done"
    assert [e["step"] for e in _strict_json(workdir / "metrics.json")["eval_history"]] == [12]


def test_metrics_file_keeps_whole_run_totals(tmp_path):
    """Totals add up over resumes, a finished run rerun keeps them, a fresh start does not
    inherit an old file's."""
    from vim_jax.train.log import MetricsFile

    path = str(tmp_path / "metrics.json")
    first = dict(train_wall_s=100.0, nonfinite_steps=2, corrupt_images=1, corrupt_image_ids=["a"],
                 train_loss=float("nan"))
    MetricsFile(path, 0).write("preempted", [{"step": 2, "loss": 1.0}], **first)
    assert _strict_json(path)["train_loss"] is None
    second = dict(train_wall_s=50.0, nonfinite_steps=1, corrupt_images=1, corrupt_image_ids=["b"],
                  train_loss=0.5)
    out = MetricsFile(path, 2).write("done", [{"step": 4, "loss": 0.5}], **second)
    assert (out["train_wall_s"], out["nonfinite_steps"], out["corrupt_images"]) == (150.0, 3, 2)
    assert out["corrupt_image_ids"] == ["a", "b"] and len(out["loss_history"]) == 2
    rerun = MetricsFile(path, 4).write("done", [], train_wall_s=9.0, nonfinite_steps=0,
                                       corrupt_images=0, corrupt_image_ids=[], train_loss=float("nan"))
    assert (rerun["train_wall_s"], rerun["nonfinite_steps"], rerun["train_loss"]) == (150.0, 3, 0.5)
    fresh = MetricsFile(path, 0).write("running", [{"step": 2, "loss": 2.0}], train_wall_s=1.0)
    assert fresh["train_wall_s"] == 1.0 and len(fresh["loss_history"]) == 1


def _strict_json(path):
    """The JSON in ``path``, refusing NaN and infinity as the JSON standard does."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}: not JSON")
    return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def test_second_ctrl_c_aborts():
    from vim_jax.train.log import Preemption

    old = signal.getsignal(signal.SIGINT)
    with Preemption() as preempt:
        os.kill(os.getpid(), signal.SIGINT)
        assert preempt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old


def _numpy_eval(model, source, data_cfg) -> dict:
    """Top-1/top-5 (%), mean loss and count in NumPy over the logits of ``model`` called
    directly (no eval step, no mesh), on batches of 5 (other padding than the run's 8)."""
    from vim_jax.data.pipeline import eval_batches

    logits, labels = [], []
    for b in eval_batches(source, data_cfg, local_batch=5):
        keep = b["mask"] > 0
        logits.append(np.asarray(model(b["image"][keep]), np.float64))
        labels.append(b["label"][keep])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    n = len(labels)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    rank = (logits > logits[np.arange(n), labels][:, None]).sum(1)  # classes scored above
    return {"top1": 100 * np.mean(rank == 0), "top5": 100 * np.mean(rank < 5),
            "loss": -logp[np.arange(n), labels].mean(), "count": n}


def _assert_same_eval(got: dict, want: dict):
    assert got["count"] == want["count"]
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_final_eval_equals_numpy_over_the_models_logits(data, trained):
    from flax import nnx
    from vim_jax.data.sources import make_source
    from vim_jax.train.config import build_model, load_config

    workdir, metrics = trained
    config = load_config(workdir)
    model = build_model(config, 3)
    nnx.update(model, _final_params(workdir)[1])
    want = _numpy_eval(model, make_source("folder", str(data), "val"), config.data)
    assert want["count"] == 24
    _assert_same_eval(metrics["eval"], want)


def test_eval_reproduces_the_final_eval(trained):
    workdir, metrics = trained
    out = evaluate_workdir(str(workdir))
    assert out["step"] == 12
    for k in ("top1", "top5", "count"):
        assert out[k] == metrics["eval"][k]
    assert abs(out["loss"] - metrics["eval"]["loss"]) < 1e-6


def test_eval_cli_writes_results(trained):
    workdir, metrics = trained
    r = subprocess.run([sys.executable, "eval.py", "--workdir", str(workdir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((workdir / "eval_step12.json").read_text())
    assert out["top1"] == metrics["eval"]["top1"]
    assert f"top-1 {metrics['eval']['top1']:.2f}%" in r.stdout


def test_resuming_with_another_image_size_is_refused(data, trained):
    workdir, _ = trained
    with pytest.raises(TrainingError, match=r"data.image_size: 16 -> 24.*new --workdir"):
        train_and_evaluate(_config(data, data__image_size=24), str(workdir))


def test_unreadable_checkpoints_are_reported_never_moved(data, trained, tmp_path, caplog):
    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    ckpts = workdir / "checkpoints"
    # A save that never finished (orbax's temporary directory) is not a checkpoint.
    (ckpts / "14.orbax-checkpoint-tmp-1234").mkdir()
    # The latest real step has its files truncated.
    for f in (ckpts / "12" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:10])
    before = sorted(p.name for p in ckpts.iterdir())
    with caplog.at_level(logging.ERROR):
        out = evaluate_workdir(str(workdir))
    assert out["step"] == 10  # evaluation skips the unreadable step...
    assert "step 12" in caplog.text and "unreadable" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == before  # ...and leaves it where it is
    # Training neither resumes from an older step past it nor starts afresh: it says how.
    with pytest.raises(CheckpointError, match=r"step 12 .* unreadable .*wait and rerun.*go back to "
                                              r"step 10, move .*12 out of .*start over deliberately"):
        train_and_evaluate(_config(data), str(workdir))
    # Nothing readable left: a clear error, not a silent fresh start, for both.
    for step in Checkpoints(str(workdir)).steps():
        for f in (ckpts / str(step) / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
        evaluate_workdir(str(workdir))
    with pytest.raises(CheckpointError, match="start over deliberately"):
        train_and_evaluate(_config(data), str(workdir))
    assert sorted(p.name for p in ckpts.iterdir()) == before
    # A step whose item folders are not there yet (a copy in progress) is unreadable too,
    # not "another model's".
    partial = tmp_path / "partial"
    shutil.copytree(trained[0], partial)
    for item in (partial / "checkpoints" / "12").iterdir():
        if item.is_dir():
            shutil.rmtree(item)
    assert evaluate_workdir(str(partial))["step"] == 10


def test_persistent_nonfinite_steps_stop_training(data, tmp_path):
    workdir = tmp_path / "nan"
    config = _config(data, optim__base_lr=1e36, train__max_nonfinite_steps=3)
    with pytest.raises(TrainingError, match="consecutive non-finite steps"):
        train_and_evaluate(config, str(workdir))
    _, params = _final_params(workdir)
    import jax
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_config_errors_name_the_bad_value(data):
    config = _config(data, optim__batch_size=6)
    with pytest.raises(TrainingError, match="batch_size=6 must be a positive multiple of the device count 4"):
        validate_config(config, 4)
    sys.path.insert(0, str(ROOT))
    from configs.vim_finetune_stride8 import get_config

    with pytest.raises(TrainingError, match="model.pretrained"):
        validate_config(get_config("tiny"), 1)


def test_unknown_config_key_is_rejected(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/digits.py",
                        "--config.optim.learning_rate=1", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    # One line naming the full key and the nearest existing ones, no traceback.
    assert r.stderr.strip().splitlines()[-1:] == r.stderr.strip().splitlines(), r.stderr
    assert "unknown config key 'optim.learning_rate'" in r.stderr and "optim.base_lr" in r.stderr
    assert not (tmp_path / "config.json").exists()


def test_recipe_configs():
    sys.path.insert(0, str(ROOT))
    from configs import vim_base, vim_finetune_stride8, vim_small, vim_tiny

    ti, s, b = vim_tiny.get_config(), vim_small.get_config(), vim_base.get_config()
    assert (ti.optim.batch_size, ti.optim.base_lr * ti.optim.batch_size / 512, ti.optim.weight_decay,
            ti.model.drop_path_rate) == (1024, 1e-3, 0.1, 0.0)
    assert (s.optim.batch_size, s.optim.base_lr, s.optim.weight_decay, s.model.drop_path_rate) == (
        512, 1e-3, 0.05, 0.05)
    assert b.model.name == "vim_base_patch16_224"
    for c in (ti, s, b):
        assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.min_lr, c.optim.warmup_lr) == (300, 5, 1e-5, 1e-6)
        assert (c.data.mixup, c.data.cutmix, c.data.random_erasing, c.data.repeated_aug) == (0.8, 1.0, 0.25, 3)
        assert c.data.rand_augment == "rand-m9-mstd0.5-inc1" and c.optim.ema_decay == 0.99996
    from configs import digits_vig, vig_base, vig_h_base, vig_h_small, vig_h_tiny, vig_small, vig_tiny

    vig = {m.__name__.split(".")[-1]: m.get_config() for m in (vig_tiny, vig_small, vig_base, vig_h_tiny,
                                                               vig_h_small, vig_h_base)}
    # ViG's recipe (vig.md): base lr, weight decay, drop path, precision per variant.
    assert {k: (c.model.name, c.optim.base_lr, c.optim.weight_decay, c.model.drop_path_rate, c.model.dtype)
            for k, c in vig.items()} == {
        "vig_tiny": ("vig_tiny_patch16_224", 1e-3, 0.05, 0.0, "float32"),
        "vig_small": ("vig_small_patch16_224", 5e-4, 0.1, 0.2, "float32"),
        "vig_base": ("vig_base_patch16_224", 1e-3, 0.05, 0.5, "float32"),
        "vig_h_tiny": ("vig_h_tiny_224", 8e-4, 0.05, 0.2, "bfloat16"),
        "vig_h_small": ("vig_h_small_224", 5e-4, 0.05, 0.3, "bfloat16"),
        "vig_h_base": ("vig_h_base_224", 5e-4, 0.05, 0.6, "bfloat16")}
    for c in vig.values():
        assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.grad_clip, c.optim.decay_rule,
                c.optim.ema_decay, c.data.repeated_aug) == (300, 20, 5.0, "mmseg", 0.9999, 1)
        # 5e-7 and 5e-6 at batch 512, scaled with the batch like the peak.
        assert (c.optim.batch_size, c.optim.warmup_lr, c.optim.min_lr) == (1024, 1e-6, 1e-5)
        assert c.model.mixer_backend == "auto"
    # ViG-H recomputes its blocks: with remat "none" ViG-H-T's step does not fit a v5e chip.
    assert {k: c.model.remat for k, c in vig.items()} == {
        "vig_tiny": "none", "vig_small": "none", "vig_base": "none",
        "vig_h_tiny": "full", "vig_h_small": "full", "vig_h_base": "full"}
    assert digits_vig.get_config().model.name == "vig_tiny_patch16_224"
    ft = vim_finetune_stride8.get_config("small")
    assert ft.model.name == "vim_small_patch16_stride8_224" and ft.optim.epochs == 30
    assert ft.optim.weight_decay == 1e-8


_DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vim_jax import create_model
    from vim_jax.parallel import sharding as shd
    from vim_jax.train.optim import make_optimizer, lr_schedule
    from vim_jax.train.step import StepOptions, TrainState, train_step_fn
    import ml_collections

    assert jax.device_count() == 8, jax.devices()
    ocfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=1.0))
    opts = StepOptions(mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.99, seed=3)
    images = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
    labels = jnp.arange(16) % 5

    def run(devices, fsdp):
        model = create_model("vim_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=64, depth=2,
                             num_classes=5, drop_path_rate=0.1)
        model.train()
        tx = make_optimizer(ocfg, nnx.state(model, nnx.Param), lr_schedule(
            peak_lr=1e-3, warmup_lr=1e-4, min_lr=1e-5, warmup_steps=1, total_steps=10))
        step, state = train_step_fn(model, tx, opts)
        mesh = shd.make_mesh(devices)
        sh = TrainState(NamedSharding(mesh, P()), *(shd.state_shardings(t, mesh, fsdp, min_size=1024)
                                                     for t in state[1:]))
        state = shd.put_global(state, sh)
        bs = shd.batch_sharding(mesh)
        f = shd.jit_on_mesh(mesh, step, in_shardings=(sh, bs, bs), out_shardings=(sh, None))
        for _ in range(2):
            state, m = f(state, jax.device_put(images, bs), jax.device_put(labels, bs))
        sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.params)))
        return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema))], float(m["loss"]), sharded

    ref, loss1, _ = run(jax.devices()[:1], False)
    out = {}
    for name, fsdp in (("dp8", False), ("fsdp8", True)):
        got, loss, sharded = run(jax.devices(), fsdp)
        err = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)) for a, b in zip(ref, got))
        out[name] = dict(err=err, dloss=abs(loss - loss1), sharded=sharded)
    print(json.dumps(out))
""")


@pytest.mark.slow  # CI budget: about 30 s each on the 2-core CI machine
def test_eight_device_step_equals_one_device_step():
    """Data parallel (and FSDP) over 8 simulated CPU devices == 1 device, same global batch."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _DP_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fsdp8"]["sharded"] > 0 and out["dp8"]["sharded"] == 0
    for name, o in out.items():
        assert o["err"] < 1e-5 and o["dloss"] < 1e-5, (name, o)


def test_eval_of_official_weights_on_a_folder(data, vim_weights_path):
    """eval.py --pretrained path: official-format weights (10 classes, 224 px) evaluated
    on a folder at 32 px (position embedding resized on load)."""
    from vim_jax.train.evaluation import evaluate_pretrained

    config = _config(data, model__num_classes=10, data__image_size=32)
    config.model.overrides = {}
    out = evaluate_pretrained(config, str(vim_weights_path), model="vim_tiny_patch16_224")
    from vim_jax import create_model
    from vim_jax.data.sources import make_source

    model = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path), img_size=32)
    want = _numpy_eval(model, make_source("folder", str(data), "val"), config.data)
    assert 0 < want["top1"] < 100  # not trivially all or nothing
    _assert_same_eval(out, want)


def test_missing_imagenet_is_a_clean_cli_error(tmp_path):
    """The brief's usage with no ImageNet prepared: a message saying how, no traceback."""
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/vim_tiny.py",
                        "--workdir", str(tmp_path / "w"), f"--config.data.data_dir={tmp_path / 'tfds'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "error: imagenet2012 is not prepared" in r.stderr and "tfds build imagenet2012" in r.stderr
    assert "Traceback" not in r.stderr


def test_fine_tuning_with_a_new_head(data, vim_weights_path):
    """reset_head: the checkpoint's body (10-class fixture) with a fresh 3-class head."""
    import jax
    from flax import nnx
    from vim_jax import create_model
    from vim_jax.train.config import build_model

    config = _config(data, model__pretrained=str(vim_weights_path), model__reset_head=True,
                     data__image_size=32)
    config.model.overrides = {}
    model = build_model(config, 3)
    assert model.head.kernel.shape == (192, 3) and model.depth == 4
    ref = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path), img_size=32)
    got, want = nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param)
    got.pop("head"), want.pop("head")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config.model.reset_head = False
    with pytest.raises(ValueError, match="head.weight"):
        build_model(config, 3)


def test_a_training_workdir_loads_with_create_model(trained):
    """create_model(pretrained=WORKDIR): the model the run trained (name and arguments from
    its model.json), at the latest step, at an earlier step=, and its EMA weights."""
    from flax import nnx
    from vim_jax import create_model
    from vim_jax.train.config import build_model, load_config

    workdir, _ = trained
    target = nnx.state(build_model(load_config(workdir), 3), nnx.Param)
    ckpt = Checkpoints(workdir)
    steps = ckpt.steps()
    assert len(steps) >= 2
    for kw, (step, want) in (({}, ckpt.restore_params(target, ema=False)),
                             ({"step": steps[0]}, ckpt.restore_params(target, ema=False, step=steps[0])),
                             ({"ema": True}, ckpt.restore_params(target, ema=True))):
        got = nnx.state(create_model(pretrained=str(workdir), **kw), nnx.Param)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert step == steps[-1]


@pytest.mark.slow  # CI budget: about 30 s each on the 2-core CI machine
def test_finetune_folder_recipe(data, vim_weights_path, tmp_path):
    """configs/finetune_folder.py: an official-format checkpoint (the 10-class fixture)
    fine-tuned on a 3-class folder with a new head, through train.py's command line."""
    r = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/finetune_folder.py", "--workdir", str(tmp_path / "w"),
         f"--config.data.data_dir={data}", f"--config.model.pretrained={vim_weights_path}",
         "--config.data.image_size=32", "--config.optim.batch_size=8", "--config.train.num_steps=3",
         "--config.train.eval_batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["eval"]["count"] == 24
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["model"]["num_classes"] == 3 and config["model"]["reset_head"]
    # Without weights the recipe refuses to start, saying how to give them.
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/finetune_folder.py",
                        "--workdir", str(tmp_path / "w2"), f"--config.data.data_dir={data}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--config.model.pretrained=True" in r.stderr


@pytest.mark.slow  # about 30 s on the 2-core CI machine
def test_finetune_folder_recipe_takes_a_vig_checkpoint(data, tmp_path):
    """The same recipe and command line with an official-format ViG checkpoint: the recipe's
    mixer backend reaches ViG as its gla_backend, and no Vim-only argument is passed to it."""
    from conftest import fixture_path

    r = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/finetune_folder.py", "--workdir", str(tmp_path / "w"),
         f"--config.data.data_dir={data}", "--config.model.name=vig_tiny_patch16_224",
         f"--config.model.pretrained={fixture_path('vig/vig_tiny_d2.pth')}",
         "--config.data.image_size=32", "--config.optim.batch_size=8", "--config.train.num_steps=2",
         "--config.train.eval_batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "w" / "model.json").read_text())
    assert saved["name"] == "vig_tiny_patch16_224" and saved["depth"] == 2 and saved["num_classes"] == 3
    assert saved["gla_backend"] == "auto" and "scan_backend" not in saved


def test_predict_on_a_workdir_uses_its_preprocessing_and_class_names(data, trained, capsys):
    """The run's image size (16), crop ratio, mean and std, and its folder's class names."""
    import jax

    from vim_jax import create_model, predict

    workdir, _ = trained
    files = sorted(str(f) for f in (data / "val").rglob("*.JPEG"))[:3]
    predict.main(files + ["--pretrained", str(workdir), "--top", "1"])
    out = capsys.readouterr().out
    config = json.loads((workdir / "config.json").read_text())["data"]
    assert config["class_names"] == ["class_00", "class_01", "class_02"]
    model = create_model(pretrained=str(workdir))
    x = np.stack([predict.load_image(f, 16, config["eval_crop_ratio"], config["mean"], config["std"])
                  for f in files])
    probs = np.asarray(jax.nn.softmax(model(x), axis=-1))
    for f, p in zip(files, probs):
        k = int(np.argmax(p))
        assert f"{p[k]:7.2%}  {k:4d}  class_0{k}" in out.split(f)[1], out
