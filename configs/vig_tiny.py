"""ViG-T on ImageNet-1k, official recipe: python train.py --config configs/vig_tiny.py --workdir W"""

from configs.common import vig_recipe


def get_config():
    return vig_recipe("vig_tiny_patch16_224",
                      base_lr=1e-3, weight_decay=0.05, drop_path_rate=0.0, dtype="float32")
