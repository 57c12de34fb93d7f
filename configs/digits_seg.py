"""The segmentation demo: a small UperNet-Vim on canvases of scikit-learn's digit scans, on a CPU.

48x48 canvases hold one to three real 8x8 scans (2x upscaled) at random places; every
pixel is background or the digit whose ink covers it (11 classes). 3,000 training
canvases, 600 held-out ones built from held-out scans only (vim_jax/data/digits.py).

    python train.py --config configs/digits_seg.py --workdir workdir/digits_seg
    python eval.py --workdir workdir/digits_seg
"""

from configs.seg_common import ade20k_recipe


def get_config():
    c = ade20k_recipe("upernet_vim_tiny", batch_size=64, drop_path_rate=0.0)
    c.model.num_classes = 11
    # The canvases are upscaled 2x to 96x96 so that the head's stride-4 output has one
    # logit per scan pixel (a stroke is one scan pixel wide); patch 16 as the official
    # segmenter, width 96, 6 blocks. Every neck level takes the last block: on a 6x6 patch
    # grid the official "last block of each quarter" would feed the finest levels from
    # the first blocks, before they have told the digits apart.
    c.model.overrides.patch_size = 16
    c.model.overrides.embed_dim = 96
    c.model.overrides.depth = 6
    c.model.overrides.layers = (5, 5, 5, 5)
    c.model.overrides.channels = 64
    c.model.overrides.aux_channels = 64

    d = c.data
    d.name = "digits_seg"
    d.data_dir = ""
    d.train_split, d.eval_split = "train", "test"
    d.image_size = 96
    d.mean = d.std = (0.5, 0.5, 0.5)
    d.shuffle_buffer = 3000
    d.resize_scale = (96, 96)        # every canvas 2x (bilinear image, nearest mask)
    d.resize_ratio = (1.0, 1.0)
    d.cat_max_ratio = 1.0            # off: background is over 90% of almost every canvas
    d.hflip = False                  # mirrored digits are other symbols
    d.photometric = False
    d.reduce_zero_label = False      # 0 is the background class, not "ignore"
    d.eval_size = (96, 96)           # metrics on the 2x canvases (each pixel counted 4 times)

    # Background is ~92% of the pixels: digit pixels weigh 3x (mmseg's class_weight).
    c.seg.class_weight = (1.0,) + (3.0,) * 10
    c.seg.eval_mode = "whole"
    c.seg.plot_images = 8

    o = c.optim
    o.base_lr = 0.032                # peak lr = 0.032 * 64 / 512 = 4e-3
    o.weight_decay = 0.05
    o.schedule = "cosine"
    o.warmup_steps = -1
    o.warmup_epochs = 2
    o.warmup_lr = 1e-6
    o.min_lr = 1e-5
    o.layer_decay = 0.0              # trained from scratch
    o.epochs = 8                     # 368 steps, about 9 minutes on a 2-core CPU
    c.train.num_steps = -1
    c.train.log_every_steps = 23     # two lines per epoch
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 10
    c.train.eval_batch_size = 200
    return c
