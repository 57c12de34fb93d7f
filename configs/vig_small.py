"""ViG-S on ImageNet-1k, official recipe: python train.py --config configs/vig_small.py --workdir W"""

from configs.common import vig_recipe


def get_config():
    return vig_recipe("vig_small_patch16_224",
                      base_lr=5e-4, weight_decay=0.1, drop_path_rate=0.2, dtype="float32")
