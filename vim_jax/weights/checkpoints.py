"""Training checkpoints in a workdir: orbax CheckpointManager plus recovery from bad steps.

Layout: ``WORKDIR/checkpoints/<step>/{params,opt_state,ema[,batch_stats]}`` (batch_stats
for models with BatchNorm, the segmenters). orbax writes each step
to a temporary directory and renames it when complete, so an interrupted save leaves no
step behind. Nothing here moves, renames or deletes a step it cannot read (truncated files,
or a copy still in progress): evaluation skips it with an error in the log and uses the
step before; training refuses to resume past it, or to start afresh beside it, and says how
to proceed.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from vim_jax.weights.names import mismatch_report

log = logging.getLogger(__name__)
_ITEMS = ("params", "opt_state", "ema", "batch_stats")  # the step is the directory name


def _items(state) -> tuple:
    """The items ``state`` has (an empty tree, such as a classifier's batch_stats, has none)."""
    return tuple(n for n in _ITEMS if jax.tree.leaves(getattr(state, n)))


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the model; the message says which."""


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpoints:
    """Saves and restores a training state under ``workdir/checkpoints``: any NamedTuple with
    a ``step`` and the items ``params``, ``opt_state``, ``ema``, ``batch_stats``
    (``vim_jax.train.step.TrainState``); a model alone as ``params`` and ``ema``."""

    def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000):
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                     create=True)
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        # Handlers named up front, so a fresh process can read item metadata before restoring.
        handlers = {name: ocp.StandardCheckpointHandler() for name in _ITEMS}
        return ocp.CheckpointManager(self.dir, options=self._options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Saves ``state`` as ``step`` if that step is due (or ``force``); returns whether it
        saved. ``step`` is the host's count (== state.step): asking never waits for the
        device. Asynchronous."""
        if not (force or self.manager.should_save(step)):
            return False
        args = ocp.args.Composite(**{name: ocp.args.StandardSave(getattr(state, name))
                                     for name in _items(state)})
        return self.manager.save(step, args=args, force=force)

    def save_params(self, step: int, params, batch_stats=None) -> None:
        """Saves ``params`` (as both params and ema, with ``batch_stats`` if any) at ``step``:
        a model without optimiser state, in the same layout (``python -m vim_jax.convert``).
        Asynchronous."""
        items = dict(params=params, ema=params)
        if jax.tree.leaves(batch_stats):
            items["batch_stats"] = batch_stats
        args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _check_shapes(self, step: int, name: str, target) -> None:
        items = self.manager.item_metadata(step)
        present = sorted(k for k, v in items.items() if v is not None)
        if not present:  # no item written yet (a copy in progress): unreadable, not another model's
            raise FileNotFoundError(f"no items in checkpoint step {step}")
        if name not in present:  # readable, just not this kind of checkpoint: not corrupt
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir} has no {name!r} (it has {present}): it "
                f"was written for another model (a segmenter's holds batch_stats, a "
                f"classifier's does not)")
        saved = items[name]
        want, have = _shapes(target), _shapes(saved)
        # The arrays the model needs (a checkpoint may hold more items than one restore reads).
        report = mismatch_report(f"checkpoint step {step} in {self.dir}", want,
                                 {k: v for k, v in have.items() if k in want},
                                 " (a different model, image size or class count than the config's?)")
        if report:
            raise CheckpointError(report)

    def _restore_items(self, step: int, targets: dict) -> dict:
        for name, target in targets.items():
            self._check_shapes(step, name, target)
        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in targets.items()}
        return self.manager.restore(step, args=ocp.args.Composite(**args))

    def _first_readable(self, targets: dict, step: Optional[int], *, skip_unreadable: bool):
        """(step, items) of ``step`` or else the latest readable step; (None, None) without
        any step. An unreadable step is an error unless ``skip_unreadable`` (then logged
        and passed over for the one before)."""
        have = self.steps()
        if step is not None and step not in have:
            raise CheckpointError(f"no checkpoint for step {step} in {self.dir}; have {have}")
        unreadable = []
        for s in [step] if step is not None else have[::-1]:
            try:
                return s, self._restore_items(s, targets)
            except CheckpointError:
                raise
            except Exception as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.error("checkpoint step %d in %s is unreadable (%s)", s, self.dir, why)
                unreadable.append(s)
                if step is not None or not skip_unreadable:
                    earlier = [t for t in have if t < s]
                    raise CheckpointError(
                        f"checkpoint step {s} in {self.dir} is unreadable ({why}). If its files "
                        f"are still being written or copied, wait and rerun. "
                        + (f"To go back to step {earlier[-1]}, move {os.path.join(self.dir, str(s))} "
                           f"out of {self.dir}. " if earlier else "")
                        + "To start over deliberately, use a new --workdir (or move this one "
                          "aside).") from e
                self.manager = self._manager()
        if unreadable:
            raise CheckpointError(f"none of the checkpoints in {self.dir} is readable (steps "
                                  f"{sorted(unreadable)}, left as they are): if they are still "
                                  "being copied, wait and rerun")
        return None, None

    def restore(self, target, step: Optional[int] = None):
        """The latest step (or ``step``) into ``target``'s structure and shardings; None when
        the workdir holds no checkpoint; CheckpointError when that step cannot be read."""
        targets = {name: getattr(target, name) for name in _items(target)}
        s, items = self._first_readable(targets, step, skip_unreadable=False)
        if items is None:
            return None
        step_arr = jax.make_array_from_callback((), target.step.sharding,
                                                lambda _: np.asarray(s, np.int32))
        return target._replace(step=step_arr, **{name: items[name] for name in targets})

    def restore_params(self, params, *, ema: bool, step: Optional[int] = None, batch_stats=None):
        """(step, params) of the latest readable checkpoint (or ``step``); EMA ones if ``ema``.
        Given a ``batch_stats`` target (a model with BatchNorm), (step, params, batch_stats)."""
        name = "ema" if ema else "params"
        targets = {name: params}
        if batch_stats is not None and jax.tree.leaves(batch_stats):
            targets["batch_stats"] = batch_stats
        s, items = self._first_readable(targets, step, skip_unreadable=True)
        if items is None:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        if batch_stats is None:
            return s, items[name]
        return s, items[name], items.get("batch_stats", batch_stats)
