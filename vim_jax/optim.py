"""The optimiser of the recipe: AdamW with a decay mask, warm-up + cosine, clipping."""

from __future__ import annotations

import jax
import optax

from vim_jax.pytree import path_name

# Parameters without weight decay (official: biases, norms, pos_embed, cls_token, A_log, D).
NO_DECAY = frozenset({"bias", "conv_bias", "conv_bias_b", "A_log", "A_log_b", "D", "D_b",
                      "pos_embed", "cls_token"})


def decay_mask(params):
    """Pytree of bools like ``params``: True where weight decay applies."""
    def decays(path, _):
        names = [n for n in path_name(path).split(".") if n != "value"]
        return not (names[-1] in NO_DECAY or any("norm" in n for n in names))
    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(*, peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                total_steps: int) -> optax.Schedule:
    """Linear warm-up from warmup_lr to peak_lr, then cosine down to min_lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_lr, peak_value=peak_lr, end_value=min_lr,
        warmup_steps=min(warmup_steps, max(total_steps - 1, 0)), decay_steps=max(total_steps, 1))


def make_optimizer(cfg, params, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW per ``cfg`` (the config's ``optim`` section). Non-finite steps are skipped by
    the train step itself, which leaves params and this optimiser's state untouched."""
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask(params))
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
