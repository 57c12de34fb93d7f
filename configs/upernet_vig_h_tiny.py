"""UperNet-ViG-H-T on ADE20K.

    python train.py --config configs/upernet_vig_h_tiny.py --workdir ckpts/upernet_vig_h_tiny \
        --config.data.data_dir=DIR --config.model.pretrained=True

hustvl/ViG publishes no segmentation configs or results. This is the recipe mmseg trains
hierarchical backbones of this size with (``configs/swin/upernet_swin_tiny_patch4_window7_
512x512_160k_ade20k_pretrain_224x224_1K.py`` and its bases), ViG-H-T in Swin-T's place: AdamW
lr 6e-5, weight decay 0.01 (none on norms and biases), poly (power 1) to 0 after 1,500 linear
warm-up iterations from 1e-6 of the lr, 160k iterations of batch 16 (8 GPUs x 2), drop path
0.3, no layer-wise decay, UperNet 512 channels on the four stage outputs, FCN auxiliary head
(256 channels, weight 0.4) on the stride-16 one; the ADE20K pipeline, 512 crops and sliding-
window test of ``configs/seg_common.py``. The backbone starts from the official ViG-H-T
ImageNet weights (True) or any classification checkpoint path.
"""

from configs.seg_common import ade20k_recipe

_LR, _BATCH = 6e-5, 16


def get_config():
    c = ade20k_recipe("upernet_vig_h_tiny", batch_size=_BATCH, drop_path_rate=0.3)
    c.model.require_pretrained = True
    c.model.remat = "mixer"           # keeps the GLA outputs, recomputes the rest of each block

    o = c.optim
    o.base_lr = _LR * 512 / _BATCH    # peak lr = base_lr * batch / 512 = 6e-5
    o.weight_decay = 0.01
    o.warmup_lr = _LR * 1e-6
    o.layer_decay = 0.0
    c.train.num_steps = 160_000
    c.train.eval_every_epochs = 13    # ~16k iterations at batch 16 (mmseg: every 16k)
    return c
