"""The optimisers of the recipes: AdamW with a decay mask, warm-up + cosine (DeiT) or
poly (mmseg), optional layer-wise learning-rate decay (BEiT/mmseg), clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


# Parameters without weight decay (official: biases, norms, pos_embed, cls_token, A_log, D).
NO_DECAY = frozenset({"bias", "conv_bias", "conv_bias_b", "A_log", "A_log_b", "D", "D_b",
                      "pos_embed", "cls_token"})
DECAY_RULES = ("vim", "mmseg")
SCHEDULES = ("cosine", "poly")
_EMBEDDING = ("patch_embed", "pos_embed", "cls_token")


def _names(path) -> list[str]:
    """A leaf's path without ``value`` and the segmenter's ``backbone.`` prefix."""
    names = [n for n in jax.tree_util.keystr(path, simple=True, separator=".").split(".") if n != "value"]
    return names[1:] if names[0] == "backbone" else names


def decay_mask(params, rule: str = "vim"):
    """Pytree of bools like ``params``: True where weight decay applies.

    "vim": the official classification recipe (``NO_DECAY`` names and every norm).
    "mmseg": the official segmentation recipe's LayerDecayOptimizerConstructor, and ViG's
    classification recipe: every parameter except biases and one-dimensional ones (per
    block: Vim's stacked ``layers`` carry a leading block axis; ViG-H's ``layers`` are a
    list of stages, not stacked).
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"optim.decay_rule={rule!r} is not one of {DECAY_RULES}")

    def decays(path, x):
        names = _names(path)
        if rule == "mmseg":
            stacked = names[0] == "layers" and len(names) > 1 and not names[1].isdigit()
            per_block_ndim = x.ndim - stacked
            return not (per_block_ndim <= 1 or names[-1] == "bias")
        return not (names[-1] in NO_DECAY or any("norm" in n for n in names))
    return jax.tree_util.tree_map_with_path(decays, params)


def layer_lr_scales(params, depth: int, rate: float, *, blocks: bool = False):
    """Pytree like ``params`` of learning-rate multipliers after BEiT's layer-wise decay
    (mmseg's LayerDecayOptimizerConstructor, as the official segmentation recipe): layer 0
    (patch and position embeddings) gets ``rate ** (depth + 1)``, everything after the
    blocks 1. The official constructor finds blocks by the name ``backbone.blocks.<i>``, but
    Vim's are ``backbone.layers.<i>``: in the official runs the blocks fall into the last
    group and train at the full rate. ``blocks=True`` gives block i the intended
    ``rate ** (depth - i)`` instead (an array along the stacked block axis)."""
    def scale(path, x):
        names = _names(path)
        if names[0] in _EMBEDDING:
            return jnp.float32(rate ** (depth + 1))
        if names[0] == "layers" and blocks:
            layer = jnp.arange(1, depth + 1, dtype=jnp.float32)
            return (rate ** (depth + 1 - layer)).reshape((depth,) + (1,) * (x.ndim - 1))
        return jnp.float32(1.0)
    return jax.tree_util.tree_map_with_path(scale, params)


def lr_schedule(*, peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                total_steps: int, kind: str = "cosine", power: float = 1.0) -> optax.Schedule:
    """"cosine": linear warm-up from warmup_lr to peak_lr, then cosine down to min_lr at
    total_steps (timm). "poly": mmcv's poly, ``(peak - min) (1 - t/T)^power + min``, its
    first warmup_steps multiplied by a linear ramp from warmup_lr / peak_lr to 1."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=warmup_lr, peak_value=peak_lr, end_value=min_lr,
            warmup_steps=warmup_steps, decay_steps=max(total_steps, 1))
    if kind != "poly":
        raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
    ratio = warmup_lr / peak_lr if peak_lr else 1.0

    def poly(count):
        t = jnp.minimum(count, total_steps) / max(total_steps, 1)
        lr = (peak_lr - min_lr) * (1 - t) ** power + min_lr
        ramp = 1 - (1 - count / max(warmup_steps, 1)) * (1 - ratio)
        return jnp.where(count < warmup_steps, lr * ramp, lr)
    return poly


def make_optimizer(cfg, params, schedule: optax.Schedule, *, depth: int | None = None) -> optax.GradientTransformation:
    """AdamW per ``cfg`` (the config's ``optim`` section); with ``cfg.layer_decay`` > 0 the
    updates are scaled by ``layer_lr_scales`` of a ``depth``-block backbone (per block too
    with ``cfg.layer_decay_blocks``). ``min_lr`` is scaled with the rest (mmcv does not: the
    same at the recipe's min_lr 0).
    Non-finite steps are skipped by the train step itself, which leaves params and this
    optimiser's state untouched."""
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask(params, cfg.get("decay_rule", "vim")))
    rate = cfg.get("layer_decay", 0.0)
    if rate:
        if not depth or depth <= 0:
            raise ValueError(f"optim.layer_decay={rate} needs a backbone that is one stack of "
                             f"blocks (Vim's depth), got depth={depth}: set optim.layer_decay=0 "
                             "for this model")
        scales = layer_lr_scales(params, depth, rate, blocks=cfg.get("layer_decay_blocks", False))
        tx = optax.chain(tx, optax.stateless(
            lambda updates, _: jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales)))
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
