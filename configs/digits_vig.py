"""The digits demo with ViG (gated linear attention) in place of Vim, on the CPU.

The same 1,438 training and 359 held-out scans and pipeline as ``digits.py``, upscaled to
64x64 so that ViG's stride-16 stem leaves a 4x4 grid of tokens.

    python train.py --config configs/digits_vig.py --workdir workdir/digits_vig
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.model.name = "vig_tiny_patch16_224"
    c.model.remat = "none"
    # Width 128 in 2 heads (dk 32, dv 64), 4 blocks: 16 tokens, 1.2M parameters.
    c.model.overrides = dict(embed_dim=128, num_heads=2, depth=4)
    c.data.image_size = 64
    c.optim.decay_rule = "mmseg"      # ViG's rule: no decay on biases and 1-D parameters
    c.optim.grad_clip = 5.0
    return c
