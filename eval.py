"""Evaluate a training run or converted official weights.

    python eval.py --workdir ckpts/                 # latest checkpoint, the run's own config
    python eval.py --workdir ckpts/ --step 5000 --ema
    python eval.py --pretrained vim_t_midclstok_76p1acc.pth --model vim_tiny_patch16_224 \
        --config configs/vim_tiny.py --config.data.data_dir=~/tensorflow_datasets

Prints top-1, top-5, loss and img/s (a segmentation run: mIoU, pixel accuracy, per-class
IoU) and writes them to a JSON file (eval_step<N>[_ema].json in the workdir, or --output);
for a segmentation run also a PNG of predictions beside it (eval_step<N>[_ema].png). As
several processes (see train.py), each evaluates its share and process 0 reports the totals.
"""

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vim_jax.train import cli
from vim_jax.parallel import distributed

config_flags.DEFINE_config_file("config", "configs/vim_tiny.py",
                                "Dataset and model settings for --pretrained.", lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir (its config.json and checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters.")
flags.DEFINE_string("pretrained", None, "Official .pth/.npz or converted checkpoint directory.")
flags.DEFINE_string("model", None, "Model name for --pretrained (default: the config's).")
flags.DEFINE_string("output", None, "Where to write the JSON results.")
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every restore at INFO
    try:
        distributed.initialize_from_flags(FLAGS)
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    import jax
    from vim_jax.weights.checkpoints import CheckpointError
    from vim_jax.data.sources import DataError
    from vim_jax.train.evaluation import draw_predictions, evaluate_pretrained, evaluate_workdir, summary
    from vim_jax.train.config import load_config
    from vim_jax.train.setup import task_of
    from vim_jax.train.loop import TrainingError

    if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
        raise app.UsageError("give exactly one of --workdir or --pretrained")
    try:
        if FLAGS.workdir:
            config, drawn = load_config(FLAGS.workdir), {}

            def draw(model, source):  # the picture is named after the step evaluated
                if jax.process_index() == 0:
                    drawn["model"], drawn["source"] = model, source

            segmentation = task_of(config) == "segmentation"
            results = evaluate_workdir(FLAGS.workdir, step=FLAGS.step, ema=FLAGS.ema,
                                       after=draw if segmentation else None)
            name = f"eval_step{results['step']}{'_ema' if FLAGS.ema else ''}"
            output = FLAGS.output or os.path.join(FLAGS.workdir, name + ".json")
            if drawn:
                picture = os.path.splitext(output)[0] + ".png"
                results["picture"] = draw_predictions(drawn["model"], drawn["source"], config, picture)
        else:
            results = evaluate_pretrained(FLAGS.config, FLAGS.pretrained, model=FLAGS.model)
            output = FLAGS.output
    except (DataError, TrainingError, CheckpointError) as e:  # the message is the whole story
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:  # every process computed the same numbers; one reports
        return
    print(summary(results))
    if "iou" in results:
        print("per-class IoU (%): " + "  ".join(f"{k}:{'-' if v is None else f'{v:.1f}'}"
                                            for k, v in enumerate(results["iou"])))
    if "picture" in results:
        print(f"wrote {results['picture']}")
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {output}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                        datefmt="%H:%M:%S")
    app.run(main, flags_parser=cli.parse_flags)
