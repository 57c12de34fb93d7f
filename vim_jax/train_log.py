"""What a training run reports and listens to: progress lines, TensorBoard, SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np

log = logging.getLogger(__name__)


def fmt_time(s: float) -> str:
    """Seconds as ``1d02h``, ``3h04m`` or ``5m06s``."""
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Preemption:
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
