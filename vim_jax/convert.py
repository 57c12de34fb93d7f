"""``python -m vim_jax.convert CKPT OUT [--model NAME] [--to checkpoint|safetensors]``:
weights in any form ``create_model`` reads (an official ``.pth``, an ``.npz`` or
``.safetensors`` state dict, a checkpoint directory) written as

- ``checkpoint`` (default): this project's checkpoint directory, the format training
  workdirs have, which ``create_model(pretrained=OUT)``, ``eval.py`` and
  ``predict``/``export`` read;
- ``safetensors``: for publishing: ``OUT/model.safetensors`` under the official PyTorch
  names (the official code loads it) and ``OUT/config.json`` with the model name and
  arguments, a Hugging Face model repository's layout; ``create_model(pretrained=OUT)``
  reads it (``--names vim_jax``: this project's parameter names in the file instead).
"""

from __future__ import annotations

import time

from vim_jax.train.cli import ArgumentParser, one_line_errors
from vim_jax.weights.create import create_model
from vim_jax.weights.formats import NAMES, num_params, save_hf_dir, save_pretrained


def main(argv=None):
    parser = ArgumentParser(prog="python -m vim_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="official .pth ({'model': state_dict}), .npz or "
                                           ".safetensors state dict, or a checkpoint directory")
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--model", default=None,
                        help="variant name (short or official long name); default: the name a "
                             "checkpoint directory records, else the family and size an official "
                             "state dict's keys show. Depth, classes and grid are read off it")
    parser.add_argument("--to", default="checkpoint", choices=("checkpoint", "safetensors"),
                        help="checkpoint: this project's directory; safetensors: model.safetensors "
                             "and config.json (default: checkpoint)")
    parser.add_argument("--names", default="official", choices=NAMES,
                        help="tensor names in the safetensors file (default: official)")
    parser.add_argument("--step", type=int, default=None,
                        help="with a training workdir: this step's weights (default: the latest)")
    parser.add_argument("--ema", action="store_true",
                        help="with a training workdir: its EMA weights")
    args = parser.parse_args(argv)
    if args.names != "official" and args.to != "safetensors":
        parser.error("--names applies to --to safetensors")
    with one_line_errors(parser):
        model = create_model(args.model, pretrained=args.checkpoint, step=args.step, ema=args.ema)
        start = time.perf_counter()
        if args.to == "checkpoint":
            path = save_pretrained(model, args.out)
        else:
            path = save_hf_dir(model, args.out, names=args.names)
    print(f"converted {args.checkpoint} ({num_params(model):,} parameters, "
          f"{model.config['name']}) -> {path} [{args.to}] in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
