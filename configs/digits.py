"""The README's main job: a small Vim trained on scikit-learn's handwritten digits on a CPU.

1,438 training and 359 held-out real 8x8 scans, upscaled to 32x32 by the same tfds
pipeline (decode, bicubic random-resized crop, normalise) the ImageNet configs use.

    python train.py --config configs/digits.py --workdir workdir/digits
"""

from configs.common import imagenet_recipe


def get_config():
    c = imagenet_recipe("vim_tiny_patch16_224", batch_size=64, base_lr=1e-3,
                        weight_decay=0.05, drop_path_rate=0.0)
    c.model.num_classes = 10
    # 8x8 patches on 32x32 images (2x2 scan pixels each): 16 tokens + the class token,
    # width 128, 4 blocks, 0.5M parameters.
    c.model.overrides.patch_size = 8
    c.model.overrides.embed_dim = 128
    c.model.overrides.depth = 4

    c.data.name = "digits"
    c.data.eval_split = "test"
    c.data.image_size = 32
    c.data.eval_crop_ratio = 1.0     # the scans are already tight crops
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.shuffle_buffer = 2048
    c.data.rrc_scale = (0.7, 1.0)    # a digit must stay recognisable
    c.data.hflip = False             # mirrored digits are other symbols
    c.data.rand_augment = ""
    c.data.random_erasing = 0.0
    c.data.repeated_aug = 1
    c.data.mixup = 0.0
    c.data.cutmix = 0.0

    c.optim.base_lr = 0.016          # peak lr = 0.016 * 64 / 512 = 2e-3
    c.optim.epochs = 40
    c.optim.warmup_epochs = 2
    c.optim.ema_decay = 0.0
    c.train.log_every_steps = 44     # two lines per epoch
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 10
    return c
