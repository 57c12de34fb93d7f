"""Everything a training run needs before its first step, built from its config.

``setup_run`` checks the config and the workdir it resumes, resolves the class count,
writes ``config.json`` and ``model.json``, builds the model, optimiser and jitted steps
on the mesh, and restores the latest checkpoint: the loop (``vim_jax.train.loop``) only steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Callable, Iterator

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vim_jax.parallel import sharding as shd
from vim_jax.weights.checkpoints import Checkpoints
from vim_jax.train.optim import lr_schedule, make_optimizer
from vim_jax.weights.formats import write_model_config
from vim_jax.train.config import CONFIG_FILE, TrainingError, build_model, check_choices, load_config
from vim_jax.train.step import TASKS, StepOptions, TrainState, eval_step_fn, train_step_fn

log = logging.getLogger(__name__)
# Config keys that change parameter shapes: a workdir's checkpoints only fit the same values.
_SHAPE_KEYS = ("model.name", "model.num_classes", "model.overrides", "data.image_size")


def task_of(config) -> str:
    """The config's task (configs written before segmentation have none: classification)."""
    return config.get("task", "classification")


def validate_config(config, num_devices: int) -> None:
    """Checks values that would otherwise fail deep inside JAX or silently misbehave."""
    task = task_of(config)
    if task not in TASKS:
        raise TrainingError(f"task={task!r} is not one of {TASKS}")
    if task == "segmentation":
        mixing = {k: config.data.get(k) for k in ("mixup", "cutmix", "label_smoothing")}
        if any(mixing.values()):
            raise TrainingError(f"segmentation takes no {mixing}: set them to 0")
        if not config.get("seg"):
            raise TrainingError("a segmentation config needs a seg section (configs/seg_common.py)")
        if config.model.reset_head:
            raise TrainingError("model.reset_head applies to classifiers; a segmenter's heads are "
                                "always new when model.pretrained is a classification checkpoint")
    check_choices(config)
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
    if config.train.log_every_steps <= 0:
        raise TrainingError(f"train.log_every_steps={config.train.log_every_steps} must be >= 1")


def slide_of(config):
    """(crop, stride) when a segmentation config evaluates by sliding windows, else None."""
    seg = config.get("seg") or {}
    if seg.get("eval_mode", "whole") == "slide":
        return (seg["crop"], seg["stride"])
    if seg.get("eval_mode", "whole") != "whole":
        raise TrainingError(f"seg.eval_mode={seg['eval_mode']!r} is not one of ('whole', 'slide')")
    return None


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k) == "model.overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_workdir_config(config, workdir: str, has_checkpoints: bool) -> None:
    """Refuses to resume checkpoints of another model; warns about other changed values."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not (has_checkpoints and os.path.exists(path)):
        return
    old = _flat(json.loads(load_config(workdir).to_json()))
    new = _flat(json.loads(config.to_json()))
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


def peak_lr(optim) -> float:
    """The learning rate after warm-up: ``optim.base_lr * optim.batch_size / 512`` (DeiT)."""
    return optim.base_lr * optim.batch_size / 512


@dataclasses.dataclass
class Run:
    """A set-up training run: the pieces the loop uses, all consistent with ``config``."""
    config: object                # the config as saved (class count resolved)
    workdir: str
    mesh: Mesh
    train_source: object
    eval_source: object
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    checkpoints: Checkpoints
    state: TrainState             # restored from the latest checkpoint, or fresh
    start_step: int               # == state.step, read once here
    train_step: Callable          # (state, images, labels) -> (state, metrics), jitted
    eval_step: Callable           # (params, batch_stats, images, labels, mask) -> sums, jitted
    batch_sharding: NamedSharding

    @property
    def task(self) -> str:
        return task_of(self.config)

    @property
    def peak_lr(self) -> float:
        """DeiT's scaling: base_lr per 512 images."""
        return peak_lr(self.config.optim)

    @property
    def local_batch(self) -> int:
        return self.config.optim.batch_size // jax.process_count()

    @property
    def eval_local_batch(self) -> int:
        return (self.config.train.eval_batch_size or self.config.optim.batch_size) // jax.process_count()

    def train_batches(self, corrupt) -> Iterator[dict]:
        """Global batches from ``start_step`` on, ``data.prefetch`` of them kept on device."""
        from vim_jax.data.pipeline import train_batches
        local = train_batches(self.train_source, self.config.data, seed=self.config.seed,
                              local_batch=self.local_batch, start_step=self.start_step, corrupt=corrupt)
        return shd.prefetch(local, self.batch_sharding, size=self.config.data.prefetch)


def train_program(config, model, schedule: optax.Schedule, mesh: Mesh):
    """``config``'s optimiser and training step for ``model`` (in train mode): ``(step, state,
    shardings)``: the step not yet jitted, its state on the host, and the state's placement
    on ``mesh`` (replicated, or split where ``train.fsdp``). The trainer and the TPU compile
    check (``benchmarks/tpu_compile.py``) build their step here."""
    o, d = config.optim, config.data
    backbone = getattr(model, "backbone", model)
    # Layer-wise lr decay counts Vim's stacked blocks; ViG-H's stages have no single depth.
    tx = make_optimizer(o, nnx.state(model, nnx.Param), schedule, depth=getattr(backbone, "depth", None))
    seg = config.get("seg") or {}
    opts = StepOptions(mixup=d.mixup, cutmix=d.cutmix, mix_switch_prob=d.mix_switch_prob,
                       label_smoothing=d.label_smoothing, ema_decay=o.ema_decay, seed=config.seed,
                       task=task_of(config), aux_weight=seg.get("aux_weight", 0.4),
                       class_weight=tuple(seg.get("class_weight", ())))
    step_fn, state = train_step_fn(model, tx, opts)
    shardings = TrainState(NamedSharding(mesh, P()), *(shd.state_shardings(t, mesh, config.train.fsdp)
                                                       for t in state[1:]))
    return step_fn, state, shardings


def setup_run(config, workdir: str, devices=None) -> Run:
    """Builds (or resumes) the run ``config`` describes in ``workdir``."""
    from vim_jax.data.pipeline import steps_per_epoch
    from vim_jax.data.sources import make_source

    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise TrainingError(f"--workdir {workdir} is a file: pass a directory (created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create --workdir {workdir}: {e.strerror}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise TrainingError(f"--workdir {workdir} is not writable by this user: pass another "
                            "directory, or fix its permissions")
    mesh = shd.make_mesh(devices)
    validate_config(config, mesh.size)
    d, pi, pc = config.data, jax.process_index(), jax.process_count()
    train_src = make_source(d.name, d.data_dir, d.train_split, process_index=pi, process_count=pc)
    eval_src = make_source(d.name, d.data_dir, d.eval_split, process_index=pi, process_count=pc)
    task = task_of(config)
    if train_src.task != task:
        raise TrainingError(f"data.name={d.name!r} is a {train_src.task} dataset but task={task!r}: "
                            f"use a {train_src.task} config (configs/) or another data.name")
    # The class count is resolved once and saved with the config: eval.py builds the same head.
    config = copy.deepcopy(config)
    config.model.num_classes = _num_classes(config, train_src)
    if train_src.class_names:  # saved with the run: predictions print names
        with config.unlocked():
            config.data.class_names = list(train_src.class_names)
    weights = tuple((config.get("seg") or {}).get("class_weight", ()))
    if weights and len(weights) != config.model.num_classes:
        raise TrainingError(f"seg.class_weight has {len(weights)} weights but there are "
                            f"{config.model.num_classes} classes: give one per class, or ()")
    ckpt = Checkpoints(workdir, keep=config.train.keep_checkpoints,
                       every_steps=config.train.checkpoint_every_steps)
    check_workdir_config(config, workdir, bool(ckpt.steps()))

    batch = config.optim.batch_size
    spe = steps_per_epoch(train_src, batch // pc)
    total = config.train.num_steps if config.train.num_steps > 0 else config.optim.epochs * spe
    o = config.optim
    warmup = o.warmup_steps if o.get("warmup_steps", -1) >= 0 else o.warmup_epochs * spe
    schedule = lr_schedule(peak_lr=peak_lr(o), warmup_lr=o.warmup_lr, min_lr=o.min_lr,
                           warmup_steps=warmup, total_steps=total, kind=o.get("schedule", "cosine"))

    model = build_model(config, config.model.num_classes)
    if pc > 1:  # every process has read the old config.json before process 0 replaces it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("workdir checked")
    if pi == 0:  # the workdir is also a checkpoint directory for create_model
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2))
        write_model_config(workdir, model)
    model.train()
    step_fn, state, shardings = train_program(config, model, schedule, mesh)
    model.eval()
    state = shd.put_global(state, shardings)
    state = ckpt.restore(state) or state
    bs = shd.batch_sharding(mesh)
    train_step = shd.jit_on_mesh(mesh, step_fn, in_shardings=(shardings, bs, bs),
                                 out_shardings=(shardings, None), donate_argnums=0)
    # Replicated sums: every process can read them (the confusion matrix is not a scalar).
    eval_step = shd.jit_on_mesh(mesh, eval_step_fn(model, task=task, slide=slide_of(config)),
                                in_shardings=(shardings.params, shardings.batch_stats, bs, bs, bs),
                                out_shardings=NamedSharding(mesh, P()))
    return Run(config, workdir, mesh, train_src, eval_src, spe, total, schedule, ckpt, state,
               int(jax.device_get(state.step)), train_step, eval_step, bs)
