"""Where examples come from: prepared tfds datasets, an image folder, ADE20K, or the digits
demos.

Every source yields encoded images, so one decode/augment path serves all of them.
Classification: ``{"image": encoded bytes, "label": int64, "id": string}``; segmentation
(``task == "segmentation"``): ``{"image": encoded bytes, "mask": encoded PNG bytes, "id": string}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np

from vim_jax.data.augment import DECODES_WEBP
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
    task: str = "classification"  # or "segmentation"
    class_names: tuple = ()       # where the dataset names its classes (a folder's directories)

    def dataset(self, shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
        """Encoded examples; file order shuffled with ``shuffle_seed`` (None: fixed order)."""
        return self._make(shuffle_seed)


def _example_id(ex):
    return ex.get("file_name", ex.get("image/filename", tf.constant("")))


def _standardise(ex):
    return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64), "id": _example_id(ex)}


def _standardise_segmentation(ex):
    return {"image": ex["image"], "mask": ex["segmentation_mask"], "id": _example_id(ex)}


def _tfds_source(builder, name, split, process_index, process_count, *,
                 task: str = "classification", num_classes: Optional[int] = None) -> Source:
    if split not in builder.info.splits:
        raise DataError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
    shares = [builder.info.splits[tfds.split_for_jax_process(split, process_index=i,
                                                             process_count=process_count)].num_examples
              for i in range(process_count)]

    segmentation = task == "segmentation"
    encoded = ("image", "segmentation_mask") if segmentation else ("image",)

    def make(seed):
        ds = builder.as_dataset(
            split=sub, shuffle_files=seed is not None,
            decoders={k: tfds.decode.SkipDecoding() for k in encoded},
            read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16,
                                        skip_prefetch=True))
        return ds.map(_standardise_segmentation if segmentation else _standardise)

    if num_classes is None:
        num_classes = builder.info.features["label"].num_classes
    return Source(name, split, num_classes, shares[process_index], min(shares), max(shares), make,
                  task)


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


def _generated(builder_class, name: str, data_dir: str, split, process_index, process_count):
    """A tfds builder generated locally (no network), prepared once per data_dir: process 0
    prepares it while the others wait, then any host that still lacks it (its data_dir is
    its own disk) prepares its own copy."""
    builder = builder_class(data_dir=data_dir or None)
    if process_index == 0 and not builder.is_prepared():
        builder.download_and_prepare()
    if process_count > 1:  # the others read what process 0 wrote, once it is complete
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"{name} {split} prepared")
        builder = builder_class(data_dir=data_dir or None)
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder


def _digits(data_dir: str, split, process_index, process_count) -> Source:
    from vim_jax.data.digits import SklearnDigits

    builder = _generated(SklearnDigits, "digits", data_dir, split, process_index, process_count)
    return _tfds_source(builder, "digits", split, process_index, process_count)


def _digits_seg(data_dir: str, split, process_index, process_count) -> Source:
    """The digit-canvas segmentation demo: 11 classes (0 background, 1 + digit), no ignored
    pixels, so no reduce_zero_label."""
    from vim_jax.data.digits import DigitsSegmentation

    builder = _generated(DigitsSegmentation, "digits_seg", data_dir, split, process_index,
                         process_count)
    return _tfds_source(builder, "digits_seg", split, process_index, process_count,
                        task="segmentation", num_classes=11)


# The file types the pipeline decodes (vim_jax.data.augment.decode).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif") + ((".webp",) if DECODES_WEBP else ())


def _streamed(columns: dict, read: Callable[[dict], dict], process_index, process_count):
    """Files read from disk only when the pipeline reaches them: ``columns`` (equal-length
    arrays, e.g. paths and labels) are dealt out round-robin over processes, this process's
    rows shuffled by the seed (None: in order) and mapped through ``read``.
    -> (shares of every process, make(seed) -> tf.data.Dataset)."""
    n = len(next(iter(columns.values())))
    shares = [len(range(i, n, process_count)) for i in range(process_count)]
    mine = np.arange(process_index, n, process_count)

    def make(seed):
        order = mine if seed is None else np.random.default_rng(seed).permutation(mine)
        ds = tf.data.Dataset.from_tensor_slices({k: np.asarray(v)[order] for k, v in columns.items()})
        return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return shares, make


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
            if not files:
                others = sorted(os.listdir(d))
                raise DataError(f"class directory {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                                + (f"; it has {others[:5]}" if others else " (it is empty)")
                                + ": add images or remove the directory")
            paths += [os.path.join(d, f) for f in files]
            labels += [label] * len(files)
    if not paths:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                        "subdirectories")
    shares, make = _streamed(
        {"path": np.asarray(paths), "label": np.asarray(labels, np.int64)},
        lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"], "id": ex["path"]},
        process_index, process_count)
    return Source(f"folder:{root}", split, len(classes), shares[process_index], min(shares),
                  max(shares), make, class_names=tuple(classes))


ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE20K_CLASSES = 150  # annotation 0 is "other": reduce_zero_label makes it the ignore label
ADE20K_SPLITS = ("training", "validation")


def _ade20k(data_dir: str, split, process_index, process_count) -> Source:
    """The official ADE20K scene-parsing release, ``ADEChallengeData2016/``: images/<split>/*.jpg
    paired by file stem with annotations/<split>/*.png; data_dir is that directory or its
    parent. Streamed from disk like ``_folder``."""
    how = (f"download {ADE20K_URL}, unzip it so that DIR/ADEChallengeData2016/images/training "
           "exists, and pass --config.data.data_dir=DIR")
    if not data_dir:
        raise DataError(f"data.name='ade20k' needs a data directory: {how}")
    candidates = (data_dir, os.path.join(data_dir, "ADEChallengeData2016"))
    root = next((r for r in candidates if os.path.isdir(os.path.join(r, "images"))), None)
    if root is None:
        state = "exists" if os.path.isdir(data_dir) else "does not exist"
        raise DataError(f"no ADE20K release in data_dir={data_dir!r} (it {state}; neither "
                        f"{candidates[0]}/images nor {candidates[1]}/images is there): {how}")
    if split not in ADE20K_SPLITS:
        raise DataError(f"ADE20K has no split {split!r}; it has {list(ADE20K_SPLITS)}")
    image_dir = os.path.join(root, "images", split)
    ann_dir = os.path.join(root, "annotations", split)
    for d in (image_dir, ann_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d} does not exist: the ADE20K release in {root} is incomplete; {how}")
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}): {how}")
    annotated = {os.path.splitext(f)[0] for f in os.listdir(ann_dir) if f.lower().endswith(".png")}
    unpaired = [f for f in images if os.path.splitext(f)[0] not in annotated]
    if unpaired:
        raise DataError(f"{len(unpaired)} image(s) in {image_dir} have no annotation of the same "
                        f"name in {ann_dir}, e.g. {os.path.join(image_dir, unpaired[0])} needs "
                        f"{os.path.join(ann_dir, os.path.splitext(unpaired[0])[0] + '.png')}; "
                        "restore it from the release or remove the image")
    image_paths = [os.path.join(image_dir, f) for f in images]
    mask_paths = [os.path.join(ann_dir, os.path.splitext(f)[0] + ".png") for f in images]
    shares, make = _streamed(
        {"image": np.asarray(image_paths), "mask": np.asarray(mask_paths)},
        lambda ex: {"image": tf.io.read_file(ex["image"]), "mask": tf.io.read_file(ex["mask"]),
                    "id": ex["image"]},
        process_index, process_count)
    return Source(f"ade20k:{root}", split, ADE20K_CLASSES, shares[process_index], min(shares),
                  max(shares), make, "segmentation")


_SOURCES = {"imagenet2012": _imagenet, "digits": _digits, "folder": _folder,
            "digits_seg": _digits_seg, "ade20k": _ade20k}


def make_source(name: str, data_dir: str, split: str, *, process_index: int = 0,
                process_count: int = 1) -> Source:
    """The ``split`` of dataset ``name`` for this process. Classification: imagenet2012 |
    folder | digits; segmentation (``task == "segmentation"``, image/mask pairs): ade20k
    (splits training, validation) | digits_seg (train, test)."""
    if name not in _SOURCES:
        raise DataError(f"data.name={name!r} is not one of {sorted(_SOURCES)}")
    return _SOURCES[name](data_dir, split, process_index, process_count)
