"""What a training run reports and listens to: progress lines, TensorBoard, metrics.json,
SIGTERM and Ctrl-C."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np

from vim_jax.weights.files import atomic_write
from vim_jax.train.progress import fmt_time

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), sets a flag: the loop saves a checkpoint and
    returns at the next step. A second Ctrl-C aborts at once, without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        try:
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: no handler
            self._old = {}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # the second one: the user means it
            log.warning("Ctrl-C: saving a checkpoint and stopping after this step "
                        "(press Ctrl-C again to abort without saving)")
        else:
            log.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stop(self, at_log_step: bool) -> bool:
        """Whether to save and stop now. With several processes they agree (a collective),
        at log steps only, so that every process saves the same step."""
        if jax.process_count() == 1:
            return self.requested
        if not at_log_step:
            return False
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


class Summaries:
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


class Progress:
    """Collects each step's metrics without waiting for the device; every ``log_every``
    steps fetches them (the loop's only per-interval sync), logs a progress line and
    TensorBoard scalars, and tracks non-finite (skipped) steps."""

    def __init__(self, *, start: int, total: int, steps_per_epoch: int, batch_size: int,
                 log_every: int, schedule, summaries: Summaries):
        self.total, self.spe, self.batch, self.log_every = total, steps_per_epoch, batch_size, log_every
        self.schedule, self.summaries = schedule, summaries
        self.consecutive_bad = self.total_bad = 0
        self.last_loss, self.history = float("nan"), []
        self._pending, self._t, self._step_at_t = [], time.perf_counter(), start

    def add(self, done: int, metrics: dict) -> bool:
        """Records the metrics of step ``done`` (1-based); returns whether it logged."""
        self._pending.append(metrics)
        if done % self.log_every and done != self.total:
            return False
        ms, self._pending = jax.device_get(self._pending), []
        for m in ms:
            self.consecutive_bad = 0 if m["finite"] else self.consecutive_bad + 1
        self.total_bad += sum(not m["finite"] for m in ms)
        good = [float(m["loss"]) for m in ms if m["finite"]]
        self.last_loss = float(np.mean(good)) if good else float("nan")
        self.history.append({"step": done, "loss": self.last_loss})
        now = time.perf_counter()
        rate = (done - self._step_at_t) * self.batch / (now - self._t)
        eta = (self.total - done) * (now - self._t) / (done - self._step_at_t)
        lr = float(self.schedule(done - 1))
        log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f img/s  ETA %s%s", done,
                 self.total, done / self.spe, self.last_loss, lr, rate, fmt_time(eta),
                 f"  ({self.total_bad} non-finite steps skipped)" if self.total_bad else "")
        self.summaries.scalars(done, {
            "train/loss": self.last_loss, "train/lr": lr, "train/img_per_s": rate,
            "train/grad_norm": float(np.mean([float(m["grad_norm"]) for m in ms]))})
        self._t, self._step_at_t = now, done
        return True


def _strict(x):
    """``x`` with every non-finite float as None: JSON has no NaN or infinity."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class MetricsFile:
    """A run's metrics.json: what this call has measured, merged with what the calls before
    it wrote up to the step this one resumed from (nothing of theirs on a fresh start);
    strict JSON (None for NaN)."""

    # Whole-run totals: this call's own added to the calls' before it.
    SUMMED = ("train_wall_s", "nonfinite_steps", "corrupt_images")

    def __init__(self, path: str, start_step: int):
        self.path = path
        before = {}
        if start_step > 0:
            try:
                with open(self.path) as f:
                    before = json.load(f)
            except (OSError, ValueError):
                pass
        keep = lambda h: [e for e in before.get(h, []) if e.get("step", 0) <= start_step]
        self.loss_history, self.eval_history = keep("loss_history"), keep("eval_history")
        self.before = before

    def add_eval(self, entry: dict) -> None:
        self.eval_history = [e for e in self.eval_history if e["step"] != entry["step"]] + [entry]

    def write(self, status: str, losses: list, **values) -> dict:
        """Writes the merged metrics from process 0 and returns them: ``status`` ("running",
        "preempted" or "done"), ``values``, the earlier calls' histories and totals and this
        call's ``losses`` (its progress history, steps after the resumed one). A call that
        trained nothing (a finished run rerun) keeps the earlier totals and last loss."""
        trained = bool(losses)
        for key in self.SUMMED:
            if key in values:
                values[key] = (values[key] if trained else 0) + (self.before.get(key) or 0)
        if "corrupt_image_ids" in values:
            earlier = self.before.get("corrupt_image_ids") or []
            values["corrupt_image_ids"] = earlier + [i for i in values["corrupt_image_ids"]
                                                     if i not in earlier]
        if not trained and "train_loss" in self.before:
            values["train_loss"] = self.before["train_loss"]
        out = _strict({"status": status, **values, "loss_history": self.loss_history + losses,
                       "eval_history": self.eval_history})
        if jax.process_index() == 0:
            atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(out, indent=2, allow_nan=False)))
        return out
