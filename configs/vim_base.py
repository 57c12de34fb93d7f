"""Vim-B on ImageNet-1k as the paper trains it: batch 1024, lr 1e-3, weight decay 0.05.

The paper gives no drop path rate for Vim-B; 0.1 is DeiT-B's.
"""

from configs.common import imagenet_recipe


def get_config():
    return imagenet_recipe("vim_base_patch16_224", batch_size=1024, base_lr=5e-4,
                           weight_decay=0.05, drop_path_rate=0.1)
