"""Vim-Ti on ImageNet-1k, official recipe: python train.py --config configs/vim_tiny.py --workdir W"""

from configs.common import imagenet_recipe


def get_config():
    return imagenet_recipe("vim_tiny_patch16_224", batch_size=1024, base_lr=5e-4,
                           weight_decay=0.1, drop_path_rate=0.0)
