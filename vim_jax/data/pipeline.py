"""Batches for training and evaluation from a ``Source``, deterministic by step.

The training stream is a pure function of (seed, step): epoch e shuffles with a seed
derived from (seed, e) and every example's augmentation is seeded by its position, so
resuming at step s rebuilds exactly the batches an uninterrupted run would have seen.
Corrupt images are replaced by another image of the same batch, counted and logged
with their ids.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np

from vim_jax.data import augment
from vim_jax.data.sources import DataError, Source
from vim_jax.data.tf_setup import tf

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


class CorruptImages:
    """Running count (and the first ids) of undecodable images met by the pipeline."""

    def __init__(self, keep: int = 20):
        self.count, self.ids, self._keep = 0, [], keep

    def record(self, ids, action: str) -> None:
        for i in ids:
            self.count += 1
            name = i.decode(errors="replace") if isinstance(i, bytes) else str(i)
            if len(self.ids) < self._keep:
                self.ids.append(name)
            log.warning("corrupt image %s: %s (%d corrupt so far)", name, action, self.count)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def steps_per_epoch(source: Source, local_batch: int) -> int:
    """Every process takes the same number of steps: that of the smallest share."""
    steps = source.min_num_examples // local_batch
    if steps == 0:
        raise DataError(f"{source.name}/{source.split}: {source.min_num_examples} examples per "
                        f"process are fewer than one batch of {local_batch}")
    return steps


def _fix_corrupt(batch: dict, corrupt: CorruptImages) -> dict:
    bad = ~batch.pop("valid")
    ids = batch.pop("id")
    if bad.any():
        if bad.all():
            raise DataError(f"every image of a batch failed to decode, e.g. {ids[0]!r}: "
                            "the dataset is unreadable")
        corrupt.record(ids[bad], "replaced by another image of its batch")
        good = np.flatnonzero(~bad)
        src = good[np.arange(bad.sum()) % len(good)]
        for k in batch:
            batch[k] = batch[k].copy()  # tf.data hands out read-only buffers
            batch[k][bad] = batch[k][src]
    return batch


def _epoch_dataset(source: Source, cfg, seed: int, epoch: int, local_batch: int, steps: int,
                   skip_batches: int) -> tf.data.Dataset:
    es = _epoch_seed(seed, epoch)
    ds = source.dataset(shuffle_seed=es)
    ds = ds.shuffle(min(cfg.shuffle_buffer, source.num_examples), seed=es,
                    reshuffle_each_iteration=False)
    r = cfg.repeated_aug
    if r > 1:
        # Repeated augmentation (Hoffer et al.; DeiT's RASampler): N/r images, each r times,
        # with different augmentations, in the same global batch.
        ds = ds.take(math.ceil(source.num_examples / r))
        ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(r))
    ds = ds.take(steps * local_batch).enumerate().skip(skip_batches * local_batch)

    def transform(i, ex):
        image, valid = augment.train_transform(ex["image"], tf.stack([tf.cast(es, tf.int64), i]), cfg)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "valid": valid, "id": ex["id"]}

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(local_batch, drop_remainder=True)


def train_batches(source: Source, cfg, *, seed: int, local_batch: int, start_step: int = 0,
                  corrupt: CorruptImages | None = None) -> Iterator[dict]:
    """Endless numpy batches {"image": (b, S, S, 3) float32, "label": (b,) int32} from step
    ``start_step`` on; ``cfg`` is the config's ``data`` section."""
    corrupt = corrupt if corrupt is not None else CorruptImages()
    steps = steps_per_epoch(source, local_batch)
    epoch, skip = divmod(start_step, steps)
    options = tf.data.Options()
    options.deterministic = True
    while True:
        ds = _epoch_dataset(source, cfg, seed, epoch, local_batch, steps, skip)
        ds = ds.with_options(options).prefetch(AUTOTUNE)
        for batch in ds.as_numpy_iterator():
            yield _fix_corrupt(batch, corrupt)
        epoch, skip = epoch + 1, 0


def eval_batches(source: Source, cfg, *, local_batch: int,
                 corrupt: CorruptImages | None = None) -> Iterator[dict]:
    """One pass over this process's share, in order, as full batches: the last one padded
    with mask=0 rows, so every process yields ceil(max share / batch) batches."""
    corrupt = corrupt if corrupt is not None else CorruptImages()

    def transform(ex):
        image, valid = augment.eval_transform(ex["image"], cfg)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "valid": valid, "id": ex["id"]}

    ds = source.dataset(None).map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch).prefetch(AUTOTUNE)
    num_batches = math.ceil(source.max_num_examples / local_batch)
    blank = None
    for batch in ds.as_numpy_iterator():
        n = len(batch["label"])
        bad = ~batch["valid"]
        if bad.any():  # a corrupt eval image counts as a miss: masked out, and reported
            corrupt.record(batch["id"][bad], "left out of the evaluation")
        mask = batch.pop("valid").astype(np.float32)
        batch.pop("id")
        pad = local_batch - n
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        batch["mask"] = mask
        blank = {k: np.zeros_like(v) for k, v in batch.items()}
        num_batches -= 1
        yield batch
    # A process with a smaller share still joins every (collective) eval step.
    for _ in range(num_batches if blank is not None else 0):
        yield blank
