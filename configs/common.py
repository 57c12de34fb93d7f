"""The recipes every config starts from (each file overrides what differs): DeiT's, which
Vim trains with, and ViG's (hustvl/ViG classification/config.py and configs/)."""

import ml_collections


def imagenet_recipe(model: str, *, batch_size: int, base_lr: float, weight_decay: float,
                    drop_path_rate: float) -> ml_collections.ConfigDict:
    """Official Vim ImageNet-1k recipe (DeiT's): 300 epochs of AdamW, cosine, heavy augmentation."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"         # or "segmentation" (configs/seg_common.py)

    c.model = ml_collections.ConfigDict()
    c.model.name = model
    c.model.pretrained = ""           # official .pth/.npz or a checkpoint dir to start from
    c.model.require_pretrained = False  # fine-tuning configs refuse to start from scratch
    c.model.reset_head = False        # new, freshly initialised head (another class count)
    c.model.num_classes = 1000
    c.model.drop_path_rate = drop_path_rate
    c.model.dtype = "float32"         # compute dtype; params, residual and scan state stay float32
    c.model.mixer_backend = "auto"    # the sequence mixer's: Vim's scan_backend, ViG's gla_backend
    c.model.remat = "mixer"
    c.model.overrides = ml_collections.ConfigDict()  # any other create_model argument

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"      # imagenet2012 | folder | digits
    c.data.data_dir = ""              # tfds data_dir (imagenet2012, digits) or the folder root
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.eval_crop_ratio = 0.875    # eval: resize to image_size / ratio, centre crop
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.shuffle_buffer = 16_384
    c.data.prefetch = 2               # batches kept on device ahead of the step
    c.data.rrc_scale = (0.08, 1.0)    # random resized crop area range
    c.data.hflip = True
    c.data.rand_augment = "rand-m9-mstd0.5-inc1"  # timm notation; "" turns it off
    c.data.random_erasing = 0.25
    c.data.repeated_aug = 3
    c.data.mixup = 0.8                # Beta alpha; 0 turns mixup off
    c.data.cutmix = 1.0               # Beta alpha; 0 turns cutmix off
    c.data.mix_switch_prob = 0.5      # chance of cutmix when both are on
    c.data.label_smoothing = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = batch_size   # global, over all devices and hosts
    c.optim.base_lr = base_lr         # peak lr = base_lr * batch_size / 512 (DeiT scaling)
    c.optim.weight_decay = weight_decay
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.epochs = 300
    c.optim.warmup_epochs = 5
    c.optim.warmup_steps = -1         # >= 0 overrides warmup_epochs
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.schedule = "cosine"       # cosine | poly (mmseg's, power 1)
    c.optim.decay_rule = "vim"        # which params decay: vim (named) | mmseg (not 1-D, not bias)
    c.optim.layer_decay = 0.0         # layer-wise lr decay rate (vim_jax.train.optim.layer_lr_scales); 0 = off
    c.optim.layer_decay_blocks = False  # decay per block too (the official runs do not: see there)
    c.optim.grad_clip = 0.0           # global-norm clip; 0 = off
    c.optim.ema_decay = 0.99996       # per step; 0 = no EMA

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = -1            # -1: epochs * steps per epoch; > 0: the run's length in
    #                                   steps in place of epochs (the lr schedule spans it too)
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 3
    c.train.eval_every_epochs = 10
    c.train.eval_batch_size = 0       # 0: same as optim.batch_size
    c.train.max_nonfinite_steps = 20  # consecutive skipped steps before training stops
    c.train.fsdp = False              # shard params and optimiser state over the data axis
    return c


# ViG-H's blocks recomputed in the backward pass: at 128 images a chip ViG-H-T's train step
# needs 20.5 GiB of a TPU v5e's 15.75 with remat "none", 15.7 with "mixer", 11.7 with "full"
# (benchmarks/tpu_compile.py, model code of commit b3bcae2, 2026-12-05). On an 80 GB GPU,
# --config.model.remat=none trains faster.
VIG_H_REMAT = "full"


def vig_recipe(model: str, *, base_lr: float, weight_decay: float, drop_path_rate: float,
               dtype: str = "float32", batch_size: int = 1024, remat: str = "none") -> ml_collections.ConfigDict:
    """Official ViG ImageNet-1k recipe: DeiT's augmentation without repeated augmentation,
    20 warm-up epochs, gradient clipping at 5, decay on every weight of two or more
    dimensions (pos_embed included), EMA 0.9999."""
    c = imagenet_recipe(model, batch_size=batch_size, base_lr=base_lr, weight_decay=weight_decay,
                        drop_path_rate=drop_path_rate)
    c.model.dtype = dtype             # plain ViG trains in float32, ViG-H with half precision
    c.model.remat = remat             # "none", "mixer" or "full" (each block recomputed backward)
    c.data.repeated_aug = 1
    c.optim.warmup_epochs = 20
    # The official warm-up and final lr scale with the batch like the peak (5e-7 and 5e-6 at 512).
    c.optim.warmup_lr = 5e-7 * batch_size / 512
    c.optim.min_lr = 5e-6 * batch_size / 512
    c.optim.grad_clip = 5.0
    c.optim.decay_rule = "mmseg"      # no decay on biases and 1-D parameters only
    c.optim.ema_decay = 0.9999
    return c
