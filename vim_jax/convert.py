"""``python -m vim_jax.convert CKPT OUT_DIR [--model NAME]``: an official checkpoint
(``.pth`` holding ``{"model": state_dict}``, or an ``.npz`` with the official keys) into
this project's checkpoint directory, the format training workdirs have, which
``create_model(pretrained=OUT_DIR)``, ``eval.py`` and ``predict``/``export`` read."""

from __future__ import annotations

import argparse

from vim_jax.models.registry import create_model
from vim_jax.pretrained import num_params, save_pretrained


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="official .pth ({'model': state_dict}) or .npz state dict")
    parser.add_argument("out_dir", help="directory to write the converted checkpoint to")
    parser.add_argument("--model", default="vim_tiny_patch16_224",
                        help="variant name (short or official long name); depth, classes and "
                             "grid are read off the checkpoint")
    args = parser.parse_args(argv)
    model = create_model(args.model, pretrained=args.checkpoint)
    path = save_pretrained(model, args.out_dir)
    print(f"converted {args.checkpoint} ({num_params(model):,} parameters, "
          f"{model.config['name']}) -> {path}")


if __name__ == "__main__":
    main()
