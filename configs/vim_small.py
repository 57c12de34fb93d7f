"""Vim-S on ImageNet-1k, official recipe."""

from configs.common import imagenet_recipe


def get_config():
    return imagenet_recipe("vim_small_patch16_224", batch_size=512, base_lr=1e-3,
                           weight_decay=0.05, drop_path_rate=0.05)
