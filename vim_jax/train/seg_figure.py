"""A picture of segmentation predictions: rows of image | ground truth | prediction."""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

from vim_jax.train.segmentation import IGNORE


def palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours: class 0 dark grey, the others spread in hue;
    the last row (ignored pixels) white."""
    colours = [(40, 40, 40)]
    for k in range(1, num_classes):
        h = (k * 0.618034) % 1.0  # golden-ratio hue steps keep neighbours apart
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)))
    return np.asarray(colours + [(255, 255, 255)], np.uint8)


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8; IGNORE white."""
    idx = np.where(labels == IGNORE, num_classes, np.clip(labels, 0, num_classes - 1))
    return palette(num_classes)[idx]


def save_predictions(path: str, images: np.ndarray, labels: np.ndarray, preds: np.ndarray, *,
                     mean: Sequence[float], std: Sequence[float], class_names: Sequence[str] = (),
                     min_size: int = 144) -> None:
    """Writes a PNG: one row per image (batch, H, W, 3) normalised as ``(x/255 - mean)/std``,
    its labels (batch, H, W) and predictions (batch, H, W); small images enlarged (nearest)
    to ``min_size``; a colour legend below when ``class_names`` are given."""
    from PIL import Image, ImageDraw

    k = len(class_names) or int(max(np.max(preds), np.max(np.where(labels == IGNORE, 0, labels)))) + 1
    rgb = np.clip((images * np.asarray(std) + np.asarray(mean)) * 255 + 0.5, 0, 255).astype(np.uint8)
    h, w = images.shape[1:3]
    zoom = max(1, -(-min_size // max(h, w)))
    gap = 4
    cell_h, cell_w = h * zoom, w * zoom
    legend = 22 * (-(-len(class_names) // 6)) + 8 if class_names else 0
    header = 20
    out = Image.new("RGB", (3 * cell_w + 4 * gap, header + len(images) * (cell_h + gap) + gap + legend),
                    (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((gap + j * (cell_w + gap) + 4, 4), title, fill=(0, 0, 0))
    for i in range(len(images)):
        row = [rgb[i], colourise(labels[i], k), colourise(preds[i], k)]
        for j, a in enumerate(row):
            tile = Image.fromarray(a).resize((cell_w, cell_h), Image.NEAREST)
            out.paste(tile, (gap + j * (cell_w + gap), header + i * (cell_h + gap)))
    colours = palette(k)
    y0 = header + len(images) * (cell_h + gap) + 4
    for n, name in enumerate(class_names):
        x, y = gap + (n % 6) * ((out.width - gap) // 6), y0 + (n // 6) * 22
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(int(c) for c in colours[n]))
        draw.text((x + 18, y + 2), str(name), fill=(0, 0, 0))
    out.save(path)
