"""Train (or resume) a Vim: python train.py --config configs/vim_tiny.py --workdir ckpts/

Any config value can be overridden: --config.optim.batch_size=256. Rerunning the same
command resumes from the latest checkpoint in --workdir.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally file.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, config.json, metrics.json and TensorBoard logs.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO

    if flags.FLAGS.distributed:
        jax.distributed.initialize()
    from vim_jax.checkpoints import CheckpointError
    from vim_jax.data.sources import DataError
    from vim_jax.trainer import TrainingError, train_and_evaluate

    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (DataError, TrainingError, CheckpointError) as e:  # the message is the whole story
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                        datefmt="%H:%M:%S")
    app.run(main)
