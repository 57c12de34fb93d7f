"""Fine-tune a pretrained Vim on your own ImageNet-style folder (a new head for its classes).

    python train.py --config configs/finetune_folder.py --workdir W \
        --config.data.data_dir=DIR --config.model.pretrained=True

DIR holds train/<class>/<image> and val/<class>/<image> (JPEG, PNG, ...), streamed from
disk. pretrained=True takes the official weights of model.name from the Hugging Face Hub
(or give a .pth/.npz path or a checkpoint directory); the head is replaced by a fresh one
for DIR's classes. The recipe is the official fine-tuning one scaled to a small dataset:
AdamW at a low learning rate, short warm-up, light augmentation, no mixup/cutmix or
repeated augmentation (they need many images per class), EMA off.
"""

from configs.common import imagenet_recipe


def get_config():
    c = imagenet_recipe("vim_tiny_patch16_224", batch_size=64, base_lr=5e-5, weight_decay=0.05,
                        drop_path_rate=0.05)
    c.model.require_pretrained = True
    c.model.reset_head = True
    c.model.num_classes = 0           # from the folder's train/ classes
    c.data.name = "folder"
    c.data.eval_split = "val"
    c.data.shuffle_buffer = 4096
    c.data.rand_augment = "rand-m9-mstd0.5-inc1"
    c.data.random_erasing = 0.0
    c.data.repeated_aug = 1
    c.data.mixup = 0.0
    c.data.cutmix = 0.0
    c.optim.epochs = 30
    c.optim.warmup_epochs = 2
    c.optim.min_lr = 1e-6
    c.optim.ema_decay = 0.0
    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 5
    return c
