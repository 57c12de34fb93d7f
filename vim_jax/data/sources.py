"""Where examples come from: prepared tfds datasets, an image folder, or the digits demo.

Every source yields encoded images, so one decode/augment path serves all of them:
``{"image": encoded bytes, "label": int64, "id": string}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np

from vim_jax.data.tf_setup import tf, tfds


class DataError(ValueError):
    """The dataset named by the config is missing or malformed; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One split as seen by this process."""
    name: str
    split: str
    num_classes: int
    num_examples: int          # this process's share
    min_num_examples: int      # the smallest share over processes (all take the same steps)
    max_num_examples: int      # the largest (all run the same number of eval batches)
    _make: Callable[[Optional[int]], tf.data.Dataset]

    def dataset(self, shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
        """Encoded examples; file order shuffled with ``shuffle_seed`` (None: fixed order)."""
        return self._make(shuffle_seed)


def _standardise(ex):
    return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64),
            "id": ex.get("file_name", ex.get("image/filename", tf.constant("")))}


def _tfds_source(builder, name, split, process_index, process_count) -> Source:
    if split not in builder.info.splits:
        raise DataError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
    shares = [builder.info.splits[tfds.split_for_jax_process(split, process_index=i,
                                                             process_count=process_count)].num_examples
              for i in range(process_count)]

    def make(seed):
        ds = builder.as_dataset(
            split=sub, shuffle_files=seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16,
                                        skip_prefetch=True))
        return ds.map(_standardise)

    return Source(name, split, builder.info.features["label"].num_classes,
                  shares[process_index], min(shares), max(shares), make)


def _imagenet(data_dir: str, split, process_index, process_count) -> Source:
    builder = tfds.builder("imagenet2012", data_dir=data_dir or None, try_gcs=False)
    if not builder.is_prepared():
        where = data_dir or "~/tensorflow_datasets"
        missing = "" if os.path.isdir(os.path.expanduser(where)) else " (the directory does not exist)"
        raise DataError(
            f"imagenet2012 is not prepared in data_dir={where!r}{missing}. ImageNet cannot be downloaded "
            f"automatically: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
            f"https://image-net.org) in {where}/downloads/manual/, then run "
            f"`tfds build imagenet2012 --data_dir {where}` once; or point "
            f"--config.data.name=folder --config.data.data_dir=DIR at an extracted "
            f"train/<class>/*.JPEG, val/<class>/* tree.")
    return _tfds_source(builder, "imagenet2012", split, process_index, process_count)


def _digits(data_dir: str, split, process_index, process_count) -> Source:
    from vim_jax.data.digits import SklearnDigits

    builder = SklearnDigits(data_dir=data_dir or None)
    if process_index == 0 and not builder.is_prepared():
        builder.download_and_prepare()  # generated from scikit-learn's copy: no network
    if process_count > 1:  # the others read what process 0 wrote, once it is complete
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"digits {split} prepared")
        builder = SklearnDigits(data_dir=data_dir or None)
        if not builder.is_prepared():  # another host, whose data_dir is its own disk
            builder.download_and_prepare()
    return _tfds_source(builder, "digits", split, process_index, process_count)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _folder(root: str, split, process_index, process_count) -> Source:
    """``root/split/<class>/<image>``, streamed: only the file list is held in memory (and
    shuffled); each image is read from disk when the pipeline reaches it."""
    if not root:
        raise DataError("data.name='folder' needs --config.data.data_dir=DIR, a directory with "
                        "train/<class>/* and val/<class>/* images")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        have = sorted(d for d in os.listdir(root)) if os.path.isdir(root) else None
        raise DataError(f"image folder {root!r} has no {split!r} subdirectory "
                        f"({'it does not exist' if have is None else f'it has {have}'}); "
                        f"expected {root}/{split}/<class>/<image>")
    # Classes are the class directories of the train split (so val/ may lack some).
    class_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else split_dir
    classes = sorted(e.name for e in os.scandir(class_root) if e.is_dir())
    unknown = sorted(set(e.name for e in os.scandir(split_dir) if e.is_dir()) - set(classes))
    if unknown:
        raise DataError(f"{split_dir} has class directories that {class_root} lacks: {unknown[:5]}; "
                        "every class needs training images")
    paths, labels = [], []
    for label, name in enumerate(classes):
        d = os.path.join(split_dir, name)
        if os.path.isdir(d):
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(d, f) for f in files]
            labels += [label] * len(files)
    if not paths:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                        "subdirectories")
    n = len(paths)
    shares = [len(range(i, n, process_count)) for i in range(process_count)]
    mine = np.arange(process_index, n, process_count)

    def make(seed):
        order = mine if seed is None else np.random.default_rng(seed).permutation(mine)
        ds = tf.data.Dataset.from_tensor_slices(
            (np.asarray(paths)[order], np.asarray(labels, np.int64)[order]))
        return ds.map(lambda path, label: {"image": tf.io.read_file(path), "label": label, "id": path},
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return Source(f"folder:{root}", split, len(classes), shares[process_index], min(shares),
                  max(shares), make)


_SOURCES = {"imagenet2012": _imagenet, "digits": _digits, "folder": _folder}


def make_source(name: str, data_dir: str, split: str, *, process_index: int = 0,
                process_count: int = 1) -> Source:
    """The ``split`` of dataset ``name`` (imagenet2012 | folder | digits) for this process."""
    if name not in _SOURCES:
        raise DataError(f"data.name={name!r} is not one of {sorted(_SOURCES)}")
    return _SOURCES[name](data_dir, split, process_index, process_count)
