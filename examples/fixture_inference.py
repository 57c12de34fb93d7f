"""Runs a converted checkpoint on the official fixture images and compares with PyTorch.

    python examples/fixture_inference.py CKPT_DIR [--fixtures tests/fixtures]
"""

import argparse
import pathlib
import time

import numpy as np

from vim_jax import create_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="directory written by python -m vim_jax.convert")
    p.add_argument("--fixtures", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"),
                   help="the golden fixtures of the official code (default: the repository's)")
    args = p.parse_args()

    io = np.load(pathlib.Path(args.fixtures) / "vim_tiny_d4_io.npz")
    model = create_model(pretrained=args.ckpt_dir)
    images = io["input_nchw"].transpose(0, 2, 3, 1)  # NCHW (PyTorch) -> NHWC
    t = time.perf_counter()
    logits = np.asarray(model(images))
    print(f"{model.config['name']} depth {model.depth}, {images.shape[0]} images "
          f"{images.shape[1]}x{images.shape[2]}: {time.perf_counter() - t:.2f} s (incl. compile)")
    print("predicted classes:", logits.argmax(-1).tolist(),
          " official:", io["logits"].argmax(-1).tolist())
    print(f"max |logits - official PyTorch logits| = {np.abs(logits - io['logits']).max():.2e}")


if __name__ == "__main__":
    main()
