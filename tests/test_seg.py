"""Vim as a dense-prediction backbone: feature maps, the multi-scale neck, UperNet, and a
classification checkpoint loaded into the segmenter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vim_jax import create_model
from vim_jax.models.seg import MultiScaleNeck, adaptive_avg_pool
from vim_jax.models.vim import VisionMamba


def _manual_block_outputs(model: VisionMamba, images):
    """Every block's output tokens and the final normed stream, block by block (no scan)."""
    residual = model.embed(images)
    hidden = jnp.zeros_like(residual)
    outs = []
    for i in range(model.depth):
        residual = residual + hidden
        hidden = model.layer(i)(residual)
        outs.append(hidden)
    return outs, model.norm_f(residual + hidden)


def _same(x, y):
    """Two pytrees hold the same (non-empty) leaves, bit for bit."""
    x, y = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(x) == len(y) > 0
    for a, b in zip(x, y):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_feature_maps_are_block_outputs_without_the_class_token():
    """At three input sizes (two not square): each map is its block's output tokens, class
    token removed, reshaped to the patch grid; the removed token is the one pooled."""
    model = create_model("vim_tiny_patch16_224", depth=4, embed_dim=32, patch_size=8, stride=8,
                         img_size=32, num_classes=3)
    maps_fn = nnx.jit(lambda m, x: m.forward_intermediates(x, layers=(0, 2, -1), norm=True))
    manual_fn = nnx.jit(_manual_block_outputs)
    pooled_fn = nnx.jit(lambda m, x: m.forward_features(x))
    for h, w in ((32, 32), (32, 48), (48, 40)):
        images = jax.random.normal(jax.random.key(0), (2, h, w, 3))
        maps = maps_fn(model, images)
        outs, final = manual_fn(model, images)
        gh, gw = h // 8, w // 8
        mid = gh * gw // 2  # the class token sits in the middle of the sequence
        for got, want in zip(maps, [outs[0], outs[2], outs[3], final]):
            assert got.shape == (2, gh, gw, 32)
            patches = np.delete(np.asarray(want), mid, axis=1)
            np.testing.assert_allclose(np.asarray(got).reshape(2, gh * gw, 32), patches, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(final[:, mid]), np.asarray(pooled_fn(model, images)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[4\] out of range for a 4-block model"):
        model.forward_intermediates(images, layers=(4,))


@pytest.mark.parametrize("stride,grids", [(16, [(16, 24), (8, 12), (4, 6), (2, 3)]),
                                          (8, [(8, 12), (4, 6), (2, 3), (1, 1)])])
def test_neck_strides(stride, grids):
    """From maps at the backbone's stride to strides 4, 8, 16, 32 of the image."""
    neck = MultiScaleNeck(8, stride, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 6, 8))
    assert [tuple(o.shape[1:3]) for o in neck([x] * 4)] == grids


def test_adaptive_pool_bins_follow_pytorch():
    """Bins of 5 rows into 3: [0, 2), [1, 4), [3, 5) (floor start, ceil end)."""
    x = jnp.arange(5.0)[None, :, None, None] * jnp.ones((1, 1, 2, 1))
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(x, 3))[0, :, 0, 0], [0.5, 2.0, 3.5])


def test_upernet_logits_have_the_input_size():
    model = create_model("upernet_vim_tiny", num_classes=5, depth=4, embed_dim=32, channels=16,
                         aux_channels=8, img_size=64)
    # Built in eval mode throughout: BatchNorm on running statistics, no dropout.
    assert model.decode.fuse.bn.use_running_average and model.aux.dropout.deterministic
    assert model.backbone.deterministic
    both = nnx.jit(lambda m, x: m.logits_and_aux(x))
    for h, w in ((64, 64), (64, 96)):
        images = jax.random.normal(jax.random.key(1), (2, h, w, 3))
        logits, aux = both(model, images)
        assert logits.shape == aux.shape == (2, h, w, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, images)), np.asarray(logits),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of the backbone stride 16"):
        model(jnp.zeros((1, 60, 64, 3)))


def test_classification_checkpoint_loads_into_the_segmenter(vim_weights_path):
    """The official-format fixture (depth 4, 10 classes, 224 px) into upernet_vim_tiny at
    64 px: the backbone is the checkpoint (class token and head dropped, the patch position
    embedding resized), the neck and heads are a fresh initialisation."""
    seg = create_model("upernet_vim_tiny", num_classes=7, pretrained=str(vim_weights_path), img_size=64)
    cls = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path), img_size=64)
    fresh = create_model("upernet_vim_tiny", num_classes=7, depth=4, img_size=64)
    assert seg.backbone.depth == 4 and not hasattr(seg.backbone, "head")
    got, want = nnx.state(seg.backbone, nnx.Param), nnx.state(cls, nnx.Param)
    np.testing.assert_array_equal(np.asarray(got["pos_embed"][...]),
                                  np.delete(np.asarray(want["pos_embed"][...]), 8, axis=1))  # 16 patches
    for key in ("layers", "patch_embed", "norm_f"):
        _same(got[key], want[key])
    for part in ("neck", "decode", "aux"):
        for kind in (nnx.Param, nnx.BatchStat):
            _same(nnx.state(getattr(seg, part), kind), nnx.state(getattr(fresh, part), kind))


# ----------------------------------------------------------------------------- ViG-H's segmenter

_VIG_H = dict(dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), channels=16, aux_channels=8)


def test_vig_h_upernet_takes_the_four_stage_outputs_without_a_neck():
    """upernet_vig_h_tiny: ViG-H's four normed stage outputs (widths 16..128, strides 4..32)
    go straight to UperNet (one lateral per width) and the stride-16 one to the FCN head;
    logits at the input size, square or not; sizes off the stride 32 are refused."""
    from vim_jax.models.seg import ViGHUperNet

    model = create_model("upernet_vig_h_tiny", num_classes=5, img_size=64, **_VIG_H)
    assert isinstance(model, ViGHUperNet) and not hasattr(model, "neck")
    assert model.backbone.norm is None and len(model.backbone.outnorms) == 4  # the dense backbone
    assert [m.conv.in_features for m in model.decode.lateral] == [16, 32, 64]
    assert model.decode.ppm[0].conv.in_features == 128 and model.aux.conv.conv.in_features == 64
    assert model.decode.fuse.bn.use_running_average and model.backbone.deterministic
    graphdef, state = nnx.split(model)

    def shapes(fn, h, w):  # by tracing, no compilation
        x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
        return jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(lambda s, x: fn(nnx.merge(graphdef, s), x), state, x))

    assert [m[0] for m in shapes(lambda m, x: m._levels(x), 64, 96)] == [
        (2, 16 // 2 ** i, 24 // 2 ** i, 16 * 2 ** i) for i in range(4)]
    for h, w in ((64, 64), (64, 96)):
        assert shapes(lambda m, x: m(x), h, w) == ((2, h, w, 5), jnp.float32)
    logits, aux = nnx.jit(lambda m, x: m.logits_and_aux(x))(model, jax.random.normal(jax.random.key(1), (2, 64, 96, 3)))
    assert logits.shape == aux.shape == (2, 64, 96, 5) and np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="multiples of the backbone stride 32"):
        model(jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match=r"depths=\(1, 1\): UperNet takes ViG-H's four stages"):
        create_model("upernet_vig_h_tiny", num_classes=5, img_size=64, **{**_VIG_H, "depths": (1, 1)})
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['embed_dim'\] for upernet_vig_h_tiny"):
        create_model("upernet_vig_h_tiny", embed_dim=32)


def test_vig_h_classification_checkpoint_loads_into_the_segmenter(tmp_path):
    """A ViG-H classifier saved under the official names (four stages, 3 classes) into
    upernet_vig_h_tiny at another size: stem and stages are the checkpoint's; the classifier
    (norm and head) is dropped, as the official dense backbone deletes it; out norms and heads
    are a fresh initialisation. A Vim checkpoint is refused by name."""
    from vim_jax.weights.formats import save_pretrained, save_safetensors

    arch = dict(dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    # One seed throughout: the segmenter's own copy of the classifier is the same program
    # as the classifier, and the fresh segmenter as the loaded one (one compilation each).
    cls = create_model("vig_h_tiny_224", num_classes=3, img_size=96, **arch)
    # Moved off the initialisation the segmenter's backbone starts from (the same stream).
    nnx.update(cls, jax.tree.map(lambda x: x + 0.5, nnx.state(cls, nnx.Param)))
    path = save_safetensors(cls, tmp_path / "vig_h.safetensors", names="official")
    small = dict(channels=16, aux_channels=8)
    seg = create_model("upernet_vig_h_tiny", num_classes=7, pretrained=str(path), img_size=96, **small)
    fresh = create_model("upernet_vig_h_tiny", num_classes=7, img_size=96, **small, **arch)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in seg.config.items() if k in arch} == arch
    got, want = nnx.state(seg.backbone, nnx.Param), nnx.state(cls, nnx.Param)

    for key in ("stem", "layers"):
        _same(got[key], want[key])
    _same(got["outnorms"], nnx.state(fresh.backbone, nnx.Param)["outnorms"])
    for part in ("decode", "aux"):
        for kind in (nnx.Param, nnx.BatchStat):
            _same(nnx.state(getattr(seg, part), kind), nnx.state(getattr(fresh, part), kind))

    vim = save_pretrained(create_model("vim_tiny_patch16_224", depth=1, embed_dim=32, img_size=32),
                          tmp_path / "vim")
    with pytest.raises(ValueError, match="holds a 'vim_tiny_patch16_224'.*not upernet_vig_h_tiny's backbone"):
        create_model("upernet_vig_h_tiny", pretrained=str(vim), img_size=64, **small)
