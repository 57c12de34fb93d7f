"""Train (or resume) a Vim: python train.py --config configs/vim_tiny.py --workdir ckpts/

Any config value can be overridden: --config.optim.batch_size=256. Rerunning the same
command resumes from the latest checkpoint in --workdir. Several processes (hosts): see
vim_jax/parallel/distributed.py (flags, environment, --distributed) and vim_jax/launch.py.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from vim_jax.train import cli
from vim_jax.parallel import distributed

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally file.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, config.json, metrics.json and TensorBoard logs.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    try:
        distributed.initialize_from_flags(flags.FLAGS)
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    from vim_jax.weights.checkpoints import CheckpointError
    from vim_jax.data.sources import DataError
    from vim_jax.train.loop import TrainingError, train_and_evaluate

    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (DataError, TrainingError, CheckpointError) as e:  # the message is the whole story
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                        datefmt="%H:%M:%S")
    app.run(main, flags_parser=cli.parse_flags)
