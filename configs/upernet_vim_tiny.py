"""UperNet-Vim-Ti on ADE20K, the official recipe (configs/seg_common.py): 41.0 mIoU reported.

    python train.py --config configs/upernet_vim_tiny.py --workdir ckpts/upernet_tiny \
        --config.data.data_dir=DIR --config.model.pretrained=True

with DIR holding the extracted ADEChallengeData2016 and the backbone started from the
official Vim-Ti ImageNet weights (True) or a path to any classification checkpoint.
"""

from configs.seg_common import ade20k_recipe


def get_config():
    c = ade20k_recipe("upernet_vim_tiny")
    c.model.require_pretrained = True  # the official recipe fine-tunes an ImageNet backbone
    return c
