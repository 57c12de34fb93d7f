"""ViG-H-S on ImageNet-1k, official recipe: python train.py --config configs/vig_h_small.py --workdir W"""

from configs.common import VIG_H_REMAT, vig_recipe


def get_config():
    return vig_recipe("vig_h_small_224",
                      base_lr=5e-4, weight_decay=0.05, drop_path_rate=0.3, dtype="bfloat16",
                      remat=VIG_H_REMAT)
