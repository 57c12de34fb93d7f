"""The official Vim segmentation recipe (UperNet on ADE20K), shared by segmentation configs.

hustvl/Vim ``seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py`` with its bases
``_base_/models/upernet_vim.py``, ``_base_/datasets/ade20k.py``, ``_base_/schedules/schedule_60k.py``,
as run by ``seg/scripts/ft_vim_tiny_upernet.sh`` (which overrides lr to 2e-4 and weight
decay to 0.1): AdamW lr 2e-4, betas (0.9, 0.999), weight decay 0.1 (not on biases and 1-D
parameters), mmseg's LayerDecayOptimizerConstructor with rate 0.92 over 24 layers (which,
as Vim names its blocks, scales only the embeddings: ``vim_jax.train.optim.layer_lr_scales``),
poly (power 1, min 0) after 1,500 linear warm-up iterations from 1e-6 of the lr, 60k
iterations of batch 32 per node (4 GPUs x 8), 512x512 crops, auxiliary FCN loss weight
0.4, sliding-window test (crop 512, stride 341).
"""

import ml_collections

from configs.common import imagenet_recipe


def ade20k_recipe(model: str = "upernet_vim_tiny", *, batch_size: int = 32,
                  drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
    """UperNet-Vim on ADEChallengeData2016 as the official segmentation configs."""
    # peak lr = base_lr * batch / 512 (the classification configs' DeiT scaling): 2e-4 at 32.
    c = imagenet_recipe(model, batch_size=batch_size, base_lr=2e-4 * 512 / 32, weight_decay=0.1,
                        drop_path_rate=drop_path_rate)
    c.task = "segmentation"
    c.model.num_classes = 150
    c.model.pretrained = ""           # a classification checkpoint for the backbone (any form)

    d = c.data
    d.name = "ade20k"                 # data_dir: the extracted ADEChallengeData2016 (or its parent)
    d.train_split, d.eval_split = "training", "validation"
    d.image_size = 512                # the training crop
    d.shuffle_buffer = 4096
    d.resize_scale = (2048, 512)      # (long, short) edge bounds of mmseg's keep-ratio Resize
    d.resize_ratio = (0.5, 2.0)       # training: the bounds scaled by r ~ U(0.5, 2)
    d.cat_max_ratio = 0.75            # a crop's largest class covers under 75% when possible
    d.hflip = True
    d.photometric = True              # mmseg's PhotoMetricDistortion
    d.reduce_zero_label = True        # ADE20K's 0 ("other") is ignored; classes 1..150 -> 0..149
    d.eval_size = (512, 1024)         # eval canvas: images resized to fit, padded (label 255)
    for off in ("rand_augment",):
        d[off] = ""
    d.random_erasing = d.mixup = d.cutmix = d.label_smoothing = 0.0
    d.repeated_aug = 1
    d.rrc_scale = (1.0, 1.0)          # unused by segmentation

    c.seg = ml_collections.ConfigDict()
    c.seg.aux_weight = 0.4            # FCN auxiliary head on the stride-16 level
    c.seg.class_weight = ()           # per-class loss weights; () = all 1 (official)
    c.seg.eval_mode = "slide"         # slide | whole
    c.seg.crop = 512
    c.seg.stride = 341
    c.seg.plot_images = 6             # eval.py draws this many predictions

    o = c.optim
    o.schedule = "poly"
    o.warmup_steps = 1500
    o.warmup_lr = 2e-4 * 1e-6         # mmcv warmup_ratio 1e-6 of the lr
    o.min_lr = 0.0
    o.decay_rule = "mmseg"
    o.layer_decay = 0.92
    o.ema_decay = 0.0

    c.train.num_steps = 60_000
    c.train.eval_every_epochs = 8     # ~5k iterations at batch 32 (official: every 1k)
    c.train.eval_batch_size = 8
    c.train.checkpoint_every_steps = 1000
    return c
