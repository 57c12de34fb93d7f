"""train_and_evaluate(config, workdir): the training loop behind train.py.

Data parallel over a mesh of every device (optionally FSDP), resumable from the latest
checkpoint in ``workdir`` with exactly the data order and randomness of an uninterrupted
run, saves on SIGTERM, skips and counts non-finite steps, logs progress and TensorBoard
summaries, and writes ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vim_jax import sharding as shd
from vim_jax.checkpoints import Checkpoints
from vim_jax.evaluation import evaluate
from vim_jax.optim import lr_schedule, make_optimizer
from vim_jax.pretrained import write_model_config
from vim_jax.run_config import CONFIG_FILE, TrainingError, build_model, load_config
from vim_jax.train_step import StepOptions, TrainState, eval_step_fn, train_step_fn

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
# Config keys that change parameter shapes: a workdir's checkpoints only fit the same values.
_SHAPE_KEYS = ("model.name", "model.num_classes", "model.overrides", "data.image_size")


# ----------------------------------------------------------------------------- config

def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k) == "model.overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _json_config(config) -> dict:
    return json.loads(config.to_json())


def validate_config(config, num_devices: int) -> None:
    """Checks values that would otherwise fail deep inside JAX or silently misbehave."""
    b = config.optim.batch_size
    if b <= 0 or b % num_devices or b % jax.process_count():
        raise TrainingError(f"optim.batch_size={b} must be a positive multiple of the device "
                            f"count {num_devices} (and of the process count {jax.process_count()})")
    eb = config.train.eval_batch_size or b
    if eb % num_devices:
        raise TrainingError(f"train.eval_batch_size={eb} must be a multiple of the device count {num_devices}")
    if config.model.require_pretrained and not config.model.pretrained:
        raise TrainingError("this is a fine-tuning config: set --config.model.pretrained=True "
                            "(the official weights of model.name) or =PATH (an official "
                            ".pth/.npz or a checkpoint directory)")
    for key in ("epochs", "warmup_epochs"):
        if config.optim[key] < 0:
            raise TrainingError(f"optim.{key}={config.optim[key]} must be >= 0")


def _check_workdir_config(config, workdir: str, has_checkpoints: bool) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not (has_checkpoints and os.path.exists(path)):
        return
    old, new = _flat(_json_config(load_config(workdir))), _flat(_json_config(config))
    changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    fatal = sorted(k for k in changed if any(k.startswith(s) for s in _SHAPE_KEYS))
    if fatal:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal)
        raise TrainingError(f"{workdir} holds checkpoints of a different model ({diff}); resume "
                            "with the saved config or use a new --workdir")
    for k in sorted(changed):
        log.warning("resuming with %s changed: %r -> %r", k, old.get(k), new.get(k))


def _num_classes(config, source) -> int:
    n = config.model.num_classes
    if n and n < source.num_classes:
        raise TrainingError(f"model.num_classes={n} but {source.name} has {source.num_classes} "
                            "classes")
    return n or source.num_classes


def _fmt_time(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_process(self) -> bool:
        """Whether any process got SIGTERM (a collective when there are several)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


class _Summaries:
    """TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from vim_jax.data.tf_setup import tf
            self._tf = tf
            self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for k, v in values.items():
                self._tf.summary.scalar(k, v)
        self._writer.flush()


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> Optional[dict]:
    """Trains per ``config`` in ``workdir`` (resuming from its latest checkpoint); returns
    the final metrics (also written to workdir/metrics.json), or None if preempted."""
    from vim_jax.data.pipeline import CorruptImages, steps_per_epoch, train_batches
    from vim_jax.data.sources import make_source

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(devices)
    validate_config(config, mesh.size)
    d = config.data
    pi, pc = jax.process_index(), jax.process_count()
    train_src = make_source(d.name, d.data_dir, d.train_split, process_index=pi, process_count=pc)
    eval_src = make_source(d.name, d.data_dir, d.eval_split, process_index=pi, process_count=pc)
    # The class count is resolved once and saved with the config: eval.py builds the same head.
    config = copy.deepcopy(config)
    config.model.num_classes = _num_classes(config, train_src)
    ckpt = Checkpoints(workdir, keep=config.train.keep_checkpoints,
                       every_steps=config.train.checkpoint_every_steps)
    _check_workdir_config(config, workdir, bool(ckpt.steps()))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2))

    batch = config.optim.batch_size
    local_batch = batch // pc
    eval_local = (config.train.eval_batch_size or batch) // pc
    spe = steps_per_epoch(train_src, local_batch)
    total = config.train.num_steps if config.train.num_steps > 0 else config.optim.epochs * spe
    peak_lr = config.optim.base_lr * batch / 512
    schedule = lr_schedule(peak_lr=peak_lr, warmup_lr=config.optim.warmup_lr, min_lr=config.optim.min_lr,
                           warmup_steps=config.optim.warmup_epochs * spe, total_steps=total)

    model = build_model(config, config.model.num_classes)
    if jax.process_index() == 0:  # the workdir is also a checkpoint directory for create_model
        write_model_config(workdir, model)
    model.train()
    tx = make_optimizer(config.optim, nnx.state(model, nnx.Param), schedule)
    opts = StepOptions(mixup=d.mixup, cutmix=d.cutmix, mix_switch_prob=d.mix_switch_prob,
                       label_smoothing=d.label_smoothing, ema_decay=config.optim.ema_decay,
                       seed=config.seed)
    step_fn, state = train_step_fn(model, tx, opts)
    model.eval()
    eval_fn = eval_step_fn(model)

    fsdp = config.train.fsdp
    shardings = TrainState(NamedSharding(mesh, P()), shd.state_shardings(state.params, mesh, fsdp),
                           shd.state_shardings(state.opt_state, mesh, fsdp),
                           shd.state_shardings(state.ema, mesh, fsdp))
    state = shd.put_global(state, shardings)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
    start = int(jax.device_get(state.step))
    bs = shd.batch_sharding(mesh)
    train_step = shd.jit_on_mesh(mesh, step_fn, in_shardings=(shardings, bs, bs),
                                 out_shardings=(shardings, None), donate_argnums=0)
    eval_step = shd.jit_on_mesh(mesh, eval_fn, in_shardings=(shardings.params, bs, bs, bs))

    log.info("%s on %d device(s) x %d process(es), %s, compute %s: %d train / %d eval images per "
             "process, batch %d, %d steps/epoch, %d steps, peak lr %.3g%s", config.model.name, mesh.size,
             pc, "FSDP" if fsdp else "data parallel", config.model.dtype,
             train_src.num_examples, eval_src.num_examples, batch, spe, total, peak_lr,
             f"; resumed at step {start}" if start else "")

    corrupt = CorruptImages()
    summaries = _Summaries(workdir)

    eval_history = []

    def run_eval(step: int) -> dict:
        out = {"eval": evaluate(eval_step, state.params, eval_src, d, local_batch=eval_local,
                                sharding=bs, corrupt=corrupt)}
        if config.optim.ema_decay > 0:
            out["eval_ema"] = evaluate(eval_step, state.ema, eval_src, d, local_batch=eval_local,
                                       sharding=bs, corrupt=corrupt)
        for name, r in out.items():
            log.info("step %d %s: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images, %.0f img/s)",
                     step, name, r["top1"], r["top5"], r["loss"], r["count"], r["img_per_s"])
            summaries.scalars(step, {f"{name}/{k}": r[k] for k in ("top1", "top5", "loss")})
        eval_history.append({"step": step, **{f"{name}_{k}": r[k] for name, r in out.items()
                                              for k in ("top1", "top5", "loss")}})
        return out

    batches = shd.prefetch(train_batches(train_src, d, seed=config.seed, local_batch=local_batch,
                                         start_step=start, corrupt=corrupt),
                           bs, size=config.data.prefetch)
    pending, consecutive_bad, total_bad, last_loss, history = [], 0, 0, float("nan"), []
    t0 = t_log = time.perf_counter()
    steps_at_log = start
    eval_every = max(1, config.train.eval_every_epochs) * spe
    with _Preemption() as preempt:
        for step in range(start, total):
            b = next(batches)
            state, metrics = train_step(state, b["image"], b["label"])
            pending.append(metrics)
            done = step + 1
            logged = done % config.train.log_every_steps == 0 or done == total
            if logged:
                ms = jax.device_get(pending)
                pending = []
                finite = [bool(m["finite"]) for m in ms]
                for f in finite:
                    consecutive_bad = 0 if f else consecutive_bad + 1
                total_bad += finite.count(False)
                good = [float(m["loss"]) for m in ms if bool(m["finite"])]
                last_loss = float(np.mean(good)) if good else float("nan")
                history.append({"step": done, "loss": last_loss})
                now = time.perf_counter()
                rate = (done - steps_at_log) * batch / (now - t_log)
                eta = (total - done) * (now - t_log) / (done - steps_at_log)
                lr = float(schedule(done - 1))
                log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f img/s  ETA %s%s",
                         done, total, done / spe, last_loss, lr, rate, _fmt_time(eta),
                         f"  ({total_bad} non-finite steps skipped)" if total_bad else "")
                summaries.scalars(done, {"train/loss": last_loss, "train/lr": lr, "train/img_per_s": rate,
                                         "train/grad_norm": float(np.mean([float(m["grad_norm"]) for m in ms]))})
                t_log, steps_at_log = now, done
                if consecutive_bad >= config.train.max_nonfinite_steps:
                    ckpt.wait()
                    raise TrainingError(
                        f"{consecutive_bad} consecutive non-finite steps up to step {done} (loss or "
                        f"gradients NaN/inf): stopping. Checkpoints hold only finite parameters "
                        f"(latest: step {max(ckpt.steps(), default=None)}); lower optim.base_lr, set "
                        f"optim.grad_clip, or use model.dtype=float32, then rerun to resume.")
            # Multi-host: agree on preemption at log steps only (it needs a collective).
            if (preempt.any_process() if logged else preempt.requested and pc == 1):
                ckpt.save(state, force=True)
                ckpt.wait()
                log.warning("preempted at step %d: checkpoint saved in %s; rerun the same "
                            "command to resume", done, ckpt.dir)
                return None
            ckpt.save(state, force=done == total)
            if done % eval_every == 0 and done != total:
                run_eval(done)

    ckpt.wait()
    results = run_eval(total)
    final = {"step": total, "epochs": total / spe, "train_loss": last_loss,
             "nonfinite_steps": total_bad, "corrupt_images": corrupt.count,
             "corrupt_image_ids": corrupt.ids, "train_wall_s": time.perf_counter() - t0, **results,
             "loss_history": history, "eval_history": eval_history}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, METRICS_FILE), "w") as f:
            json.dump(final, f, indent=2)
    log.info("done: %s", json.dumps({k: v for k, v in final.items() if k not in ("corrupt_image_ids", "loss_history", "eval_history")}))
    return final
