"""train_and_evaluate(config, workdir): the training loop behind train.py.

Data parallel over a mesh of every device (optionally FSDP), resumable from the latest
checkpoint in ``workdir`` with exactly the data order and randomness of an uninterrupted
run, saves on SIGTERM, skips and counts non-finite steps, logs progress and TensorBoard
summaries, and keeps ``metrics.json`` (the whole run's history across resumes, strict JSON,
rewritten at every evaluation, at preemption and at the end). Setup lives in
``vim_jax.train.setup``, reporting in ``vim_jax.train.log``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import ml_collections

from vim_jax.train.evaluation import REPORTED, evaluate, summary
from vim_jax.train.config import TrainingError
from vim_jax.train.log import MetricsFile, Preemption, Progress, Summaries
from vim_jax.train.setup import Run, setup_run, validate_config

__all__ = ["TrainingError", "train_and_evaluate", "validate_config"]
log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def _evaluate(run: Run, state, step: int, summaries: Summaries, corrupt) -> dict:
    """Evaluates the params (and the EMA, when kept) of ``state``; logs and summarises.
    Both use the running BatchNorm statistics (no separate EMA of them)."""
    out = {"eval": state.params, "eval_ema": state.ema if run.config.optim.ema_decay > 0 else None}
    out = {name: evaluate(run.eval_step, params, run.eval_source, run.config.data, corrupt=corrupt,
                          local_batch=run.eval_local_batch, sharding=run.batch_sharding,
                          batch_stats=state.batch_stats)
           for name, params in out.items() if params is not None}
    for name, r in out.items():
        log.info("step %d %s: %s", step, name, summary(r))
        summaries.scalars(step, {f"{name}/{k}": r[k] for k in REPORTED[run.task]})
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> Optional[dict]:
    """Trains per ``config`` in ``workdir`` (resuming from its latest checkpoint); returns
    the final metrics (also written to workdir/metrics.json), or None if preempted."""
    from vim_jax.data.pipeline import CorruptImages

    run = setup_run(config, workdir, devices)
    c, ckpt, total = run.config, run.checkpoints, run.total_steps
    log.info("%s (%s) on %d device(s) x %d process(es), %s, compute %s: %d train / %d eval images per "
             "process, batch %d, %d steps/epoch, %d steps, peak lr %.3g%s", c.model.name, run.task,
             run.mesh.size, jax.process_count(), "FSDP" if c.train.fsdp else "data parallel",
             c.model.dtype, run.train_source.num_examples, run.eval_source.num_examples,
             c.optim.batch_size, run.steps_per_epoch, total, run.peak_lr,
             f"; resumed at step {run.start_step}" if run.start_step else "")
    corrupt, summaries = CorruptImages(), Summaries(run.workdir)
    progress = Progress(start=run.start_step, total=total, steps_per_epoch=run.steps_per_epoch,
                        batch_size=c.optim.batch_size, log_every=c.train.log_every_steps,
                        schedule=run.schedule, summaries=summaries)
    eval_every = max(1, c.train.eval_every_epochs) * run.steps_per_epoch
    batches, state, t0 = run.train_batches(corrupt), run.state, time.perf_counter()
    metrics_file = MetricsFile(os.path.join(run.workdir, METRICS_FILE), run.start_step)

    def record(status: str, step: int, **values) -> dict:
        return metrics_file.write(
            status, progress.history, step=step, epochs=step / run.steps_per_epoch,
            train_loss=progress.last_loss, nonfinite_steps=progress.total_bad,
            corrupt_images=corrupt.count, corrupt_image_ids=corrupt.ids,
            train_wall_s=time.perf_counter() - t0, **values)

    def evaluate_now(step: int) -> dict:
        out = _evaluate(run, state, step, summaries, corrupt)
        metrics_file.add_eval({"step": step, **{f"{n}_{k}": r[k] for n, r in out.items()
                                                for k in REPORTED[run.task]}})
        if step != total:
            record("running", step)
        return out

    with Preemption() as preempt:
        # `step` is counted on the host: nothing below waits for the device except the
        # progress line every log_every_steps, so the next batch is prepared (and its
        # host->device copy started) while the device runs this one.
        for step in range(run.start_step + 1, total + 1):
            batch = next(batches)
            state, metrics = run.train_step(state, batch["image"], batch["label"])
            logged = progress.add(step, metrics)
            if progress.consecutive_bad >= c.train.max_nonfinite_steps:
                ckpt.wait()
                raise TrainingError(
                    f"{progress.consecutive_bad} consecutive non-finite steps up to step {step} "
                    f"(loss or gradients NaN/inf): stopping. Checkpoints hold only finite parameters "
                    f"(latest: step {max(ckpt.steps(), default=None)}); lower optim.base_lr, set "
                    f"optim.grad_clip, or use model.dtype=float32, then rerun to resume.")
            if preempt.stop(at_log_step=logged):
                ckpt.save(step, state, force=True)
                ckpt.wait()
                record("preempted", step)
                log.warning("preempted at step %d: checkpoint saved in %s; rerun the same "
                            "command to resume", step, ckpt.dir)
                return None
            ckpt.save(step, state, force=step == total)
            if step % eval_every == 0 and step != total:
                evaluate_now(step)

    ckpt.wait()
    final = record("done", total, **evaluate_now(total))
    log.info("done: %s", json.dumps({k: v for k, v in final.items()
                                     if k not in ("corrupt_image_ids", "loss_history", "eval_history")}))
    return final
