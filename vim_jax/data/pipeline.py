"""Batches for training and evaluation from a ``Source``, deterministic by step.

The training stream is a pure function of (seed, step): epoch e shuffles with a seed
derived from (seed, e) and every example's augmentation is seeded by its position, so
resuming at step s rebuilds exactly the batches an uninterrupted run would have seen.
Corrupt images are replaced by another image of the same batch, counted and logged
with their ids. Classification and segmentation sources share these loops; only the
per-example transform differs (``source.task``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Iterator

import numpy as np

from vim_jax.data import augment, seg_augment
from vim_jax.data.sources import DataError, Source
from vim_jax.data.tf_setup import tf
from vim_jax.data import IGNORE

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


def _example_transform(source: Source, cfg, train: bool) -> Callable:
    """(example, seed (2,) int64 or None) -> {"image", "label", "valid", "id"} for the task of
    ``source``: labels are (), int32 for classification, (H, W) int32 for segmentation."""
    if source.task == "classification":
        def transform(ex, seed):
            image, valid = (augment.train_transform(ex["image"], seed, cfg) if train
                            else augment.eval_transform(ex["image"], cfg))
            return {"image": image, "label": tf.cast(ex["label"], tf.int32), "valid": valid,
                    "id": ex["id"]}
    elif source.task == "segmentation":
        def transform(ex, seed):
            kw = dict(num_classes=source.num_classes, example_id=ex["id"])
            image, label, valid = (
                seg_augment.train_transform(ex["image"], ex["mask"], seed, cfg, **kw) if train
                else seg_augment.eval_transform(ex["image"], ex["mask"], cfg, **kw))
            return {"image": image, "label": label, "valid": valid, "id": ex["id"]}
    else:
        raise DataError(f"{source.name}: task {source.task!r} is neither 'classification' nor "
                        "'segmentation'")
    return transform


def _assertion(error: tf.errors.InvalidArgumentError) -> str:
    """The message a failed data check (seg_augment) put in a TF error, else its first line."""
    first = error.message.strip().split("\n")[0]
    m = re.search(r"assertion failed: \[(.*)\]\s*$", first)
    return m.group(1).replace('\\"', '"') if m else first


def _numpy_batches(ds: tf.data.Dataset, source: Source) -> Iterator[dict]:
    """``ds.as_numpy_iterator()``, with a failed data check raised as a DataError naming
    the example (its file) and the bad value."""
    it = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            raise DataError(f"{source.name}/{source.split}: {_assertion(e)}") from e
        yield batch


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
    example = _example_transform(source, cfg, train=True)

    def transform(i, ex):
        return example(ex, tf.stack([tf.cast(es, tf.int64), i]))

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(local_batch, drop_remainder=True)


def train_batches(source: Source, cfg, *, seed: int, local_batch: int, start_step: int = 0,
                  corrupt: CorruptImages | None = None) -> Iterator[dict]:
    """Endless numpy batches {"image": (b, S, S, 3) float32, "label": (b,) int32} from step
    ``start_step`` on; for a segmentation source "label" is (b, S, S) int32 (IGNORE = 255
    where unlabelled). ``cfg`` is the config's ``data`` section. A mask that fails its checks
    raises DataError naming the file and the bad value."""
    corrupt = corrupt if corrupt is not None else CorruptImages()
    steps = steps_per_epoch(source, local_batch)
    epoch, skip = divmod(start_step, steps)
    options = tf.data.Options()
    options.deterministic = True
    while True:
        ds = _epoch_dataset(source, cfg, seed, epoch, local_batch, steps, skip)
        ds = ds.with_options(options).prefetch(AUTOTUNE)
        for batch in _numpy_batches(ds, source):
            yield _fix_corrupt(batch, corrupt)
        epoch, skip = epoch + 1, 0


def eval_batches(source: Source, cfg, *, local_batch: int,
                 corrupt: CorruptImages | None = None) -> Iterator[dict]:
    """One pass over this process's share, in order, as full batches {"image": (b, S, S, 3)
    float32, "label": (b,) int32, "mask": (b,) float32}: the last one padded with mask=0
    rows, so every process yields ceil(max share / batch) batches. For a segmentation
    source images are (b, He, We, 3) and labels (b, He, We) int32, padded rows IGNORE."""
    corrupt = corrupt if corrupt is not None else CorruptImages()
    example = _example_transform(source, cfg, train=False)
    ds = source.dataset(None).map(lambda ex: example(ex, None), num_parallel_calls=AUTOTUNE,
                                  deterministic=True)
    ds = ds.batch(local_batch).prefetch(AUTOTUNE)
    num_batches = math.ceil(source.max_num_examples / local_batch)
    fill = {"label": IGNORE if source.task == "segmentation" else 0}
    blank = None
    for batch in _numpy_batches(ds, source):
        n = len(batch["label"])
        bad = ~batch["valid"]
        if bad.any():  # a corrupt eval image counts as a miss: masked out, and reported
            corrupt.record(batch["id"][bad], "left out of the evaluation")
        mask = batch.pop("valid").astype(np.float32)
        batch.pop("id")
        pad = local_batch - n
        if pad:
            batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], fill.get(k, 0), v.dtype)])
                     for k, v in batch.items()}
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        batch["mask"] = mask
        blank = {k: np.full_like(v, fill.get(k, 0)) for k, v in batch.items()}
        num_batches -= 1
        yield batch
    # A process with a smaller share still joins every (collective) eval step.
    for _ in range(num_batches if blank is not None else 0):
        yield blank
