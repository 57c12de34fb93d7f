"""Plot a training run's loss and eval accuracy from WORKDIR/metrics.json.

    python examples/plot_training.py workdir/digits [--out curve.png]

Needs matplotlib (pip install -e '.[bench]'). The curves cover the last train.py
invocation (a resumed run's earlier part is in TensorBoard).
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default WORKDIR/training.png)")
    args = p.parse_args()
    with open(os.path.join(args.workdir, "metrics.json")) as f:
        m = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in m["loss_history"]]
    ax.plot(steps, [h["loss"] for h in m["loss_history"]], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (label-smoothed)", color="tab:blue")
    acc = ax.twinx()
    ev = m.get("eval_history", [])
    for key, style in (("eval_top1", "o-"), ("eval_ema_top1", "s--")):
        if ev and key in ev[0]:
            acc.plot([e["step"] for e in ev], [e[key] for e in ev], style, color="tab:red",
                     label=key.replace("_", " "))
    acc.set_ylabel("held-out top-1 (%)", color="tab:red")
    acc.set_ylim(0, 100)
    final = m["eval"]["top1"]
    ax.set_title(f"{os.path.basename(os.path.normpath(args.workdir))}: final top-1 {final:.2f}%, "
                 f"{m['train_wall_s'] / 60:.1f} min of training")
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.5))
    fig.tight_layout()
    out = args.out or os.path.join(args.workdir, "training.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
