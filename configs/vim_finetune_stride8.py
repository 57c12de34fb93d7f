"""Fine-tune a stride-8 "+" model from a checkpoint for 30 epochs (official long-sequence recipe).

    python train.py --config configs/vim_finetune_stride8.py:tiny --workdir W \
        --config.model.pretrained=vim_t_midclstok_76p1acc.pth

The argument after ":" is tiny (default) or small.
"""

from configs.common import imagenet_recipe

_SIZES = {"tiny": dict(drop_path_rate=0.0), "small": dict(drop_path_rate=0.05)}


def get_config(size: str = "tiny"):
    if size not in _SIZES:
        raise ValueError(f"size {size!r} is not one of {sorted(_SIZES)}")
    c = imagenet_recipe(f"vim_{size}_patch16_stride8_224", batch_size=1024, base_lr=5e-6,
                        weight_decay=1e-8, **_SIZES[size])
    c.model.require_pretrained = True
    c.optim.epochs = 30
    c.optim.warmup_epochs = 5
    c.optim.warmup_lr = 1e-5  # lr 5e-6 * 1024/512 = 1e-5 peak; warm-up and floor at 1e-5
    c.optim.min_lr = 1e-5
    c.train.eval_every_epochs = 1
    return c
