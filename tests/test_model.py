"""The Vim model against the official implementation: golden fixtures and other configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import official_reference as official
from conftest import BF16_U, bf16_logit_tolerance
from vim_jax import create_model, list_models
from vim_jax.models import registry, vim

TOL = 1e-4


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_close(got, want, tol=TOL):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


def check_fixture(model, io):
    x = nhwc(io["input_nchw"])
    assert_close(model.forward_features(x), io["features"])
    assert_close(model(x), io["logits"])
    residual = model.embed(x)
    assert_close(residual, io["layer0_residual"])
    assert_close(model.layer(0)(residual), io["layer0_hidden"])


def test_fixture_from_npz(vim_weights_npz, vim_io):
    model = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_npz))
    assert (model.depth, model.num_classes, model.grid) == (4, 10, (4, 4))
    check_fixture(model, vim_io)


def test_fixture_from_pth(vim_io):
    """The official PyTorch checkpoint, read without PyTorch."""
    from conftest import fixture_path

    model = create_model(
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        pretrained=str(fixture_path("vim_tiny_d4.pth")))
    check_fixture(model, vim_io)


@pytest.mark.parametrize("name,depth,classes,img,batch", [
    ("vim_small_patch16_224", 2, 7, 48, 2),            # Small width, 3x3 grid
    ("vim_tiny_patch16_stride8_224", 2, 5, 40, 1),     # stride 8: overlapping patches, 4x4
    ("vim_tiny_patch16_384", 3, 1000, 80, 2),          # 5x5 grid, odd patch count, 1000 classes
])
def test_other_official_configs(name, depth, classes, img, batch):
    cfg = registry.VARIANTS[name]
    grid = (img - 16) // cfg["stride"] + 1
    rng = np.random.default_rng(depth * 1000 + img)
    sd = official.random_state_dict(rng, embed_dim=cfg["embed_dim"], depth=depth,
                                    num_classes=classes, num_patches=grid * grid)
    images = rng.standard_normal((batch, 3, img, img)).astype(np.float32)
    feats, logits, res0, hid0 = official.forward(sd, images, stride=cfg["stride"])

    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.npz")
        np.savez(path, **sd)
        model = create_model(name, pretrained=path)
    assert (model.depth, model.num_classes, model.grid) == (depth, classes, (grid, grid))
    x = nhwc(images)
    assert_close(model.forward_features(x), feats)
    assert_close(model(x), logits)
    assert_close(model.embed(x), res0)
    assert_close(model.layer(0)(model.embed(x)), hid0)


def test_names_and_aliases():
    names = list_models()
    for n in ("vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
              "vim_tiny_patch16_stride8_224", "vim_small_patch16_stride8_224",
              "vim_tiny_patch16_384", "vim_small_patch16_384", "vim_base_patch16_384"):
        assert n in names
    for long, short in registry.ALIASES.items():
        assert registry.resolve_name(long) == short
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        create_model("vim_huge")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['depht'\] for vim_tiny_patch16_224 "
                       r"\(did you mean 'depth' for 'depht'\?\)"):
        create_model("vim_tiny_patch16_224", depht=2)


@pytest.mark.parametrize("name,width", [("vim_tiny_patch16_224", 192), ("vim_small_patch16_224", 384),
                                        ("vim_base_patch16_224", 768)])
def test_variant_shapes_and_init(name, width):
    model = nnx.eval_shape(lambda: create_model(name))
    assert model.embed_dim == width and model.depth == 24
    assert model.pos_embed.shape == (1, 197, width)
    mixer = model.layers.mixer
    assert mixer.in_proj.kernel.shape == (24, width, 4 * width)
    assert mixer.dt_proj.kernel.shape == (24, -(-width // 16), 2 * width)


def test_official_initialisation():
    model = create_model("vim_tiny_patch16_224", depth=4, num_classes=10, img_size=64)
    mixer = model.layers.mixer
    n = np.arange(1, 17, dtype=np.float32)
    np.testing.assert_allclose(np.exp(mixer.A_log[...]), np.broadcast_to(n, (4, 384, 16)), rtol=1e-6)
    np.testing.assert_array_equal(mixer.D_b[...], 1.0)
    dt = np.log1p(np.exp(np.asarray(mixer.dt_proj.bias[...])))  # softplus
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert np.abs(mixer.dt_proj.kernel[...]).max() <= 12 ** -0.5
    # out_proj: PyTorch default bound 1/sqrt(fan_in), rescaled by 1/sqrt(depth).
    assert np.abs(mixer.out_proj.kernel[...]).max() <= 384 ** -0.5 / 2 + 1e-7
    for p in (model.pos_embed, model.cls_token, model.head.kernel):
        assert np.abs(p[...]).max() <= 0.04 + 1e-6 and 0.01 < np.std(p[...]) < 0.03
    assert np.all(model.head.bias[...] == 0)


@pytest.mark.parametrize("cls_position", ["middle", "head", "double", "none"])
def test_class_token_placements(cls_position):
    model = create_model("vim_tiny_patch16_224", depth=2, num_classes=3, img_size=64,
                         cls_position=cls_position)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    tokens = model.embed(x)
    assert tokens.shape == (2, 16 + {"middle": 1, "head": 1, "double": 2, "none": 0}[cls_position], 192)
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="cls_position='tail'"):
        create_model("vim_tiny_patch16_224", depth=1, cls_position="tail")


def test_any_resolution_interpolates_pos_embed(vim_weights_path):
    """Calling at a new size == loading the checkpoint at that size; class token untouched."""
    model = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path))
    x = jax.random.normal(jax.random.key(1), (1, 96, 112, 3))   # 6x7 grid, non-square
    logits = model(x)
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))

    big = create_model("vim_tiny_patch16_224", pretrained=str(vim_weights_path), img_size=96)
    assert big.pos_embed.shape == (1, 37, 192)
    # The class-token entry (index M//2) is carried over unchanged.
    np.testing.assert_array_equal(big.pos_embed[0, 18], model.pos_embed[0, 8])
    y = jax.random.normal(jax.random.key(2), (1, 96, 96, 3))
    assert_close(big(y), model(y), tol=1e-5)
    # A constant position embedding stays constant under the resize.
    from vim_jax.models.vim import resize_pos_embed
    flat = jnp.ones((1, 17, 4))
    np.testing.assert_allclose(resize_pos_embed(flat, "middle", (4, 4), (6, 6)), 1.0, rtol=1e-6)


def test_too_small_or_bad_images():
    model = create_model("vim_tiny_patch16_224", depth=1, img_size=32, num_classes=2)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        model(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((3, 32, 32)))


def test_drop_path_and_gradients():
    model = create_model("vim_tiny_patch16_224", depth=2, num_classes=4, img_size=32,
                         drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    eval_out = model(x)
    np.testing.assert_array_equal(eval_out, model(x))  # eval mode is deterministic
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(a, b)  # drop path draws new masks each call

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x) ** 2)

    grads = jax.grad(loss)(params, rest)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)


def test_layer_parameter_gradients_match_a_python_loop():
    """The scanned blocks (each layer's parameters picked inside the loop) against the same
    blocks called one by one: equal features and equal gradients for every stacked array."""
    model = create_model("vim_tiny_patch16_224", depth=3, img_size=32, num_classes=2, remat="full")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def scanned(params):
        return nnx.merge(graphdef, params, rest, copy=True).forward_features(x)

    def looped(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        residual, hidden = m.embed(x), 0.0
        for i in range(m.depth):
            residual = residual + hidden
            hidden = m.layer(i)(residual)
        out = m.norm_f(residual + hidden)
        return out[:, vim.class_token_indices(m.cls_position, out.shape[1] - 1)[0]]

    assert_close(scanned(params), looped(params), tol=1e-5)
    got = jax.grad(lambda p: jnp.sum(scanned(p) ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(looped(p) ** 2))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = float(np.abs(np.asarray(b)).max()) + 1e-12
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        assert err < 1e-4, (jax.tree_util.keystr(path), err)


def test_compile_size_does_not_grow_with_depth():
    """Blocks are one scanned module: the lowered program is the same size at any depth."""
    def lowered_size(depth):
        model = create_model("vim_tiny_patch16_224", depth=depth, img_size=32, num_classes=2)
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        return len(f.lower(state, jnp.zeros((1, 32, 32, 3))).as_text())

    small, deep = lowered_size(2), lowered_size(24)
    assert abs(deep - small) < 0.02 * small, (small, deep)


def test_bfloat16_compute():
    """Same weights in float32 and bfloat16 compute: logits within the rounding bound, and
    further apart than float32 rounding could explain (bfloat16 really used)."""
    depth = 2
    ref = create_model("vim_tiny_patch16_224", depth=depth, img_size=32, num_classes=10)
    model = create_model("vim_tiny_patch16_224", depth=depth, img_size=32, num_classes=10, dtype="bfloat16")
    nnx.update(model, nnx.state(ref, nnx.Param))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    out, want = model(x), np.asarray(ref(x))
    assert out.dtype == jnp.float32 and model.layers.mixer.in_proj.kernel.dtype == jnp.float32
    rel = float(np.abs(np.asarray(out) - want).max() / np.abs(want).max())
    assert BF16_U / 8 < rel < bf16_logit_tolerance(depth), rel


def test_remat_modes_agree_and_mixer_never_reruns_the_scan():
    """Every remat mode gives the same gradients; under "mixer" the backward pass keeps the
    scans' residuals instead of running the forward scans again ("full" does rerun them)."""
    # 17 tokens: two chunks of the scan, so its forward loops survive compilation.
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    grads, rerun = {}, {}
    for remat in ("mixer", "none", "full"):
        model = create_model("vim_tiny_patch16_224", depth=2, img_size=64, num_classes=3, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)
        grad = jax.jit(jax.grad(loss))
        hlo = grad.lower(params).compile().as_text()
        rerun[remat] = any(" while(" in line and "rematted_computation" in line
                           for line in hlo.splitlines())
        grads[remat] = grad(params)
    assert rerun == {"mixer": False, "none": False, "full": True}
    for remat in ("none", "full"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["mixer"])):
            scale = float(np.abs(np.asarray(b)).max()) + 1e-12
            assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale < 1e-5, remat


@pytest.mark.parametrize("kernel,stride,padding", [(16, 16, "VALID"), (16, 8, "VALID"), (9, 8, ((1, 1), (1, 1))),
                                                     (3, 2, 1), (7, 4, ((3, 2), (0, 3))), (5, 2, "VALID"),
                                                     (3, 4, (1, 1)), (5, 2, 3)])
def test_patch_embedding_is_the_convolution(kernel, stride, padding):
    """``embed_patches`` (what keeps a TPU from padding a C-minor copy of the images):
    non-overlapping patches as a reshape and one product, every other kernel, stride and
    padding (ViG's k9 s8 p1 stem, uneven padding, padding given as Flax takes it) as a
    convolution over s x s blocks; all equal the convolution, odd image sizes included, and
    none convolves the 3-channel images themselves. The same in bands of output rows (a
    first band with the padding above, one or two rows of it; a loop over the ones between;
    a shorter last one), as few rows a band as allowed or as a budget gives."""
    from vim_jax.models.vim import embed_patches

    conv = nnx.Conv(3, 8, (kernel, kernel), strides=stride, padding=padding, rngs=nnx.Rngs(0))
    for shape in ((2, 90, 50, 3), (1, 33, 41, 3)):
        images = jax.random.normal(jax.random.key(1), shape)
        for band_elements in (1 << 20, 1, 3000):  # one band; fewest rows a band; a budget's
            embed = jax.jit(lambda x: embed_patches(conv, x, jnp.float32, band_elements))
            np.testing.assert_allclose(embed(images), conv(images), rtol=1e-5, atol=1e-5)
            closed = jax.make_jaxpr(embed)(images)
            assert 3 not in _conv_input_channels(closed.jaxpr)
            if shape[0] == 2 and band_elements != 3000:  # 5 to 45 output rows, 8 a band at most
                loops = sum(e.primitive.name == "scan" for e in _eqns(closed.jaxpr))
                assert (loops > 0) == (band_elements == 1), (band_elements, loops)


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (loops, jit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.tree.leaves(eqn.params, is_leaf=lambda p: hasattr(p, "eqns") or hasattr(p, "jaxpr")):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


def _conv_input_channels(jaxpr) -> list[int]:
    """The input channels (NHWC) of every convolution in a jaxpr."""
    return [e.invars[0].aval.shape[-1] for e in _eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
