"""The segmentation demo (``digits_seg.py``) with a UperNet-ViG-H in place of UperNet-Vim.

The same canvases, 2x upscaled to 96x96, pipeline, loss and schedule; ViG-H's four stages
(strides 4 to 32: 24x24 to 3x3 tokens) feed the head directly, without Vim's neck.

    python train.py --config configs/digits_seg_vig_h.py --workdir workdir/digits_seg_vig_h
    python eval.py --workdir workdir/digits_seg_vig_h
"""

from configs import digits_seg


def get_config():
    c = digits_seg.get_config()
    c.model.name = "upernet_vig_h_tiny"
    c.model.remat = "none"
    # One block per stage, widths 32 to 256 in heads of ViG-H's size (dk 16, dv 32).
    c.model.overrides = dict(dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                             channels=64, aux_channels=64)
    return c
