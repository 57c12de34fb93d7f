"""The recipe's optimiser and step, checked against independent computations: which
parameters decay (the official rule, on the official names), the learning-rate schedule's
values, the EMA update, a skipped non-finite step, Mixup/CutMix label weights, and
bfloat16 training against float32."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import bf16_logit_tolerance
from vim_jax import create_model
from vim_jax.data.mixing import mix_batch, smooth_one_hot
from vim_jax.train.optim import decay_mask, lr_schedule, make_optimizer
from vim_jax.weights.names import params_to_state_dict
from vim_jax.train.step import StepOptions, train_step_fn


def _small_model(dtype="float32"):
    return create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, img_size=16, patch_size=8,
                        num_classes=3, dtype=dtype)


def test_weight_decay_follows_the_official_rule():
    """The official code (timm's param groups + Mamba's _no_weight_decay) decays a tensor
    unless it is 1-D, a bias, pos_embed / cls_token, or A_log / D. The mask, carried to the
    official names by the checkpoint converter, must say the same for every tensor."""
    params = nnx.state(_small_model(), nnx.Param)
    mask = decay_mask(params)
    as_arrays = jax.tree.map(lambda m, p: np.full(p.shape, float(m), np.float32), mask, params)
    official = params_to_state_dict(nnx.to_pure_dict(as_arrays), cls_position="middle")
    no_decay = {"pos_embed", "cls_token"}
    for key, value in official.items():
        name = key.rsplit(".", 1)[-1]
        want = not (value.ndim <= 1 or name == "bias" or key in no_decay
                    or name in ("A_log", "A_b_log", "D", "D_b"))
        assert np.all(value == float(want)), (key, want)
    assert any(np.all(v == 1.0) for v in official.values())  # some do decay


@pytest.mark.parametrize("name,kw", [("vig_tiny_patch16_224", dict(depth=2)),
                                     ("vig_h_tiny_224", dict(depths=(1, 1)))])
def test_weight_decay_follows_vigs_rule(name, kw):
    """ViG's code (Swin's set_weight_decay) decays a tensor unless it is 1-D or a bias;
    pos_embed decays. Checked on the official names for plain ViG and ViG-H (whose
    ``layers`` are stages, not Vim's stacked blocks)."""
    from vim_jax.weights.names import vig_params_to_state_dict

    model = nnx.eval_shape(lambda: create_model(name, img_size=64, num_classes=3, **kw))
    params = nnx.state(model, nnx.Param)
    mask = decay_mask(params, "mmseg")
    as_arrays = jax.tree.map(lambda m, p: np.full(p.shape, float(m), np.float32), mask, params)
    official = vig_params_to_state_dict(nnx.to_pure_dict(as_arrays), family=model.family)
    for key, value in official.items():
        want = not (value.ndim <= 1 or key.endswith(".bias"))
        assert np.all(value == float(want)), (key, want)
    assert "pos_embed" not in official or np.all(official["pos_embed"] == 1.0)


def test_learning_rate_schedule_values():
    """Linear warm-up from warmup_lr to the peak, cosine to min_lr: the values at the
    start, the end of warm-up, mid-cosine and the end, from the closed form."""
    peak, warm, floor, w, total = 2e-3, 1e-6, 1e-5, 10, 110
    s = lr_schedule(peak_lr=peak, warmup_lr=warm, min_lr=floor, warmup_steps=w, total_steps=total)
    cosine = lambda t: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
    for step, want in ((0, warm), (5, warm + (peak - warm) * 0.5), (w, peak), (60, cosine(60)),
                       (85, cosine(85)), (total, floor)):
        assert float(s(step)) == pytest.approx(want, rel=1e-5), step


def _step_and_state(ema_decay, dtype="float32", lr=1e-2):
    model = _small_model(dtype)
    cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=0.0))
    tx = make_optimizer(cfg, nnx.state(model, nnx.Param), optax.constant_schedule(lr))
    model.train()
    step, state = train_step_fn(model, tx, StepOptions(ema_decay=ema_decay, seed=0))
    return jax.jit(step), state


def test_ema_update_and_skipped_nonfinite_step():
    """ema' = d ema + (1 - d) params' after a finite step. A step whose loss is not finite
    leaves params, optimiser state and EMA bit-identical, and still advances the step
    (the data stream is a function of the step: the next batch comes next)."""
    step, state = _step_and_state(ema_decay=0.9)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.arange(4) % 3
    s1, m1 = step(state, images, labels)
    assert bool(m1["finite"]) and int(s1.step) == int(state.step) + 1
    for e0, p1, e1 in zip(jax.tree.leaves(state.ema), jax.tree.leaves(s1.params), jax.tree.leaves(s1.ema)):
        np.testing.assert_allclose(e1, 0.9 * np.asarray(e0) + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                         jax.tree.leaves(s1.params)))
    s2, m2 = step(s1, images.at[0, 0, 0, 0].set(jnp.nan), labels)
    assert not bool(m2["finite"]) and int(s2.step) == int(s1.step) + 1
    for name in ("params", "opt_state", "ema"):
        for a, b in zip(jax.tree.leaves(getattr(s1, name)), jax.tree.leaves(getattr(s2, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_label_weight_is_the_mixing_fraction(mode):
    """Image i of a batch is the constant i: after mixing with the reversed batch, the share
    of image i's own pixels (CutMix: the area outside the pasted box; Mixup: the blend
    coefficient) must be the weight of its own label, and the rest its partner's."""
    b, classes = 6, 6
    images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 32, 32, 3))
    labels = jnp.arange(b)
    for seed in range(5):
        mixed, targets = mix_batch(jax.random.key(seed), images, labels, num_classes=classes,
                                   mixup=0.8 if mode == "mixup" else 0.0,
                                   cutmix=1.0 if mode == "cutmix" else 0.0, smoothing=0.0)
        i, partner = 0, b - 1
        if mode == "cutmix":
            own = float(np.mean(np.asarray(mixed[i]) == i))
        else:  # mixed = lam * i + (1 - lam) * partner
            own = float((np.asarray(mixed[i]).mean() - partner) / (i - partner))
        assert float(targets[i, i]) == pytest.approx(own, abs=1e-6), seed
        assert float(targets[i, partner]) == pytest.approx(1 - own, abs=1e-6), seed
    # Smoothing spreads eps over the classes on top of the mixed weights.
    t = smooth_one_hot(labels, classes, 0.1)
    assert float(t[0, 0]) == pytest.approx(0.9 + 0.1 / classes) and float(t.sum(1)[0]) == pytest.approx(1.0)


def test_bfloat16_training_tracks_float32():
    """Six steps at lr 5e-3 on a learnable batch. bfloat16 compute trains on its own: losses
    finite and falling. At every float32 step, the bfloat16 loss of the same parameters (the
    state is float32 in both) is within the rounding bound: cross-entropy moves by at most
    2 * max|change of a logit| (its logit gradient, softmax - target, has L1 norm <= 2), and
    the logits by at most bf16_logit_tolerance(depth) of the largest one."""
    step32, s32 = _step_and_state(0.0, "float32", lr=5e-3)
    step16, s16 = _step_and_state(0.0, "bfloat16", lr=5e-3)
    labels = jnp.arange(16) % 3
    images = (0.5 * jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
              + labels[:, None, None, None] * jnp.array([1.0, -1.0, 0.5]))
    model = _small_model()
    own16 = []
    for _ in range(6):
        nnx.update(model, s32.params)
        bound = 2 * bf16_logit_tolerance(2) * float(jnp.abs(model(images)).max())
        _, same_params16 = step16(s32, images, labels)
        s32, m32 = step32(s32, images, labels)
        assert abs(float(same_params16["loss"]) - float(m32["loss"])) <= bound
        s16, m16 = step16(s16, images, labels)
        assert bool(m16["finite"])
        own16.append(float(m16["loss"]))
    assert own16[-1] < 0.75 * own16[0], own16
