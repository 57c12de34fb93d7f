"""ViG and ViG-H against the official code's outputs (tests/fixtures/vig/), on the eval
path (official weights -> official logits) and the training path; loading, saving and the
position-embedding resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from vim_jax import create_model
from vim_jax.models.vig import resize_pos_embed, torch_bicubic_matrix
from vim_jax.weights.formats import load_state_dict, save_hf_dir, save_pretrained, save_safetensors
from vim_jax.weights.names import CheckpointMismatch

TOL = 1e-4  # max abs, the fixtures' README
PLAIN, HIER = "vig_tiny_patch16_224", "vig_h_tiny_224"


def _io(name):
    io = dict(np.load(fixture_path(f"vig/{name}_io.npz")))
    return io, jnp.asarray(io["input_nchw"].transpose(0, 2, 3, 1))


def _err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float32) - want)))


@pytest.fixture(scope="module")
def plain():
    return create_model(PLAIN, pretrained=fixture_path("vig/vig_tiny_d2.pth"))


@pytest.fixture(scope="module")
def hier():
    return create_model(HIER, pretrained=fixture_path("vig/vig_h_tiny_small.pth"))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def test_plain_vig_eval_and_train_paths(plain):
    io, x = _io("vig_tiny_d2")
    assert plain.config["depth"] == 2 and plain.config["num_classes"] == 10
    tokens = lambda t: np.asarray(t).reshape(2, 16, 192)
    assert _err(tokens(plain.patch_embed(x)), io["stem"]) < TOL
    assert _err(plain.pos_embed[...], io["pos_embed_used"]) < TOL
    for suffix in ("", "_train"):
        (plain.train if suffix else plain.eval)()
        emb, grid = plain.embed(x)
        attn = plain.blocks[0].attn(plain.blocks[0].attn_norm(emb).reshape(2, *grid, 192))
        assert _err(attn, io["block0_attn_out" + suffix]) < TOL, suffix
        assert _err(tokens(plain.forward_intermediates(x, (0,))[0]), io["block0_out" + suffix]) < TOL
        assert _err(plain.forward_features(x), io["features" + suffix]) < TOL
        assert _err(plain(x), io["logits" + suffix]) < TOL, suffix
    plain.eval()
    # The eval path is not the training path (their difference is what a wrong /2 costs).
    assert _err(io["logits"], io["logits_train"]) > 1e-3


def test_hierarchical_vig_eval_and_train_paths(hier):
    io, x = _io("vig_h_tiny_small")
    assert hier.config["depths"] == (1, 1)
    stem = hier.stem(x)
    assert _err(_nchw(stem), io["stem"]) < TOL
    block = hier.layers[0].blocks[0]
    op = block.op(block.norm(stem)).reshape(stem.shape)
    assert _err(_nchw(op), io["block0_op_out"]) < TOL
    outs = hier.forward_intermediates(x)
    assert [o.shape for o in outs] == [(2, 16, 16, 96), (2, 8, 8, 192)]
    assert _err(_nchw(outs[0]), io["block0_out"]) < TOL
    assert _err(_nchw(hier.layers[0].downsample(outs[0])), io["stage0_out"]) < TOL
    assert _err(_nchw(outs[1]), io["stage1_out"]) < TOL
    assert _err(hier.forward_features(x), io["features"]) < TOL
    assert _err(hier(x), io["logits"]) < TOL
    hier.train()
    assert _err(hier(x), io["logits_train"]) < TOL
    hier.eval()


def test_torch_bicubic_resize():
    """torch's bicubic (A = -0.75, half-pixel centres, clamped edges): doubling puts output 2
    at source position 0.75, i.e. t = 0.75 between pixels 0 and 1."""
    m = torch_bicubic_matrix(4, 8)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-12)
    # Taps at offsets -1..2 of t = 0.25 (output 3, source 1.25) for A = -0.75.
    np.testing.assert_allclose(m[3], [-0.10546875, 0.87890625, 0.26171875, -0.03515625], atol=1e-12)
    np.testing.assert_allclose(torch_bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
    pos = jax.random.normal(jax.random.key(0), (1, 9, 4))
    assert resize_pos_embed(pos, (3, 3), (3, 3)) is pos
    out = resize_pos_embed(pos, (3, 3), (5, 4))
    grid = np.asarray(pos).reshape(3, 3, 4)
    want = np.einsum("ih,hwd,jw->ijd", torch_bicubic_matrix(3, 5), grid, torch_bicubic_matrix(3, 4))
    np.testing.assert_allclose(np.asarray(out).reshape(5, 4, 4), want, atol=1e-5)


def test_any_input_size_resizes_the_position_embedding(plain, tmp_path):
    """A 96 px input runs the 64 px model with its pos_embed resized; a model built at 96
    from the same weights (resized once, on loading) gives the same logits."""
    x = jax.random.normal(jax.random.key(1), (1, 96, 96, 3))
    at96 = create_model(PLAIN, pretrained=fixture_path("vig/vig_tiny_d2.pth"), img_size=96)
    assert at96.grid == (6, 6) and at96.pos_embed.shape == (1, 36, 192)
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(at96(x)), atol=1e-5)


def test_the_loader_is_strict():
    path = fixture_path("vig/vig_tiny_d2.pth")
    sd = load_state_dict(path)
    with pytest.raises(CheckpointMismatch, match=r"35 mis-shaped keys[\s\S]*g_proj\.bias': checkpoint \(192,\), "
                       r"model expects \(384,\)"):
        create_model("vig_small_patch16_224", pretrained=path)
    from vim_jax.weights.formats import load_state_dict_into

    model = create_model(PLAIN, img_size=64, depth=2, num_classes=10)
    extra = {**{k: v for k, v in sd.items() if k != "blocks.1.attn.g_norm.weight"}, "blocks.1.dirpe": sd["norm.weight"]}
    with pytest.raises(CheckpointMismatch, match=r"1 missing, 1 unexpected and 0 mis-shaped[\s\S]*"
                       r"missing key 'blocks.1.attn.g_norm.weight'[\s\S]*unexpected key 'blocks.1.dirpe'"):
        load_state_dict_into(model, extra, source="edited")


@pytest.mark.parametrize("name", [PLAIN, HIER])
def test_saved_weights_load_back(name, plain, hier, tmp_path):
    """safetensors (official and own names), the Hugging Face-style directory and the
    checkpoint directory all give back the same logits."""
    model = plain if name == PLAIN else hier
    _, x = _io("vig_tiny_d2" if name == PLAIN else "vig_h_tiny_small")
    want = np.asarray(model(x))
    save_safetensors(model, tmp_path / "official.safetensors")
    save_pretrained(model, tmp_path / "ckpt")
    if name == PLAIN:
        save_safetensors(model, tmp_path / "own.safetensors", names="vim_jax")
        save_hf_dir(model, tmp_path / "hf")
    # Every route for plain ViG; for ViG-H its own key mapping (the official-name file) and
    # the checkpoint directory (its stage list and config).
    routes = ("official.safetensors", "own.safetensors", "hf", "ckpt") if name == PLAIN else \
        ("official.safetensors", "ckpt")
    for source in routes:
        back = create_model(name, pretrained=str(tmp_path / source))
        assert _err(back(x), want) < 1e-6, source
    # The official-name file is the official state dict.
    if name == PLAIN:
        sd = load_state_dict(tmp_path / "official.safetensors")
        ref = load_state_dict(fixture_path("vig/vig_tiny_d2.pth"))
        assert sorted(sd) == sorted(ref)
        assert max(_err(sd[k], ref[k]) for k in ref) == 0


def test_training_path_gradients_and_remat():
    """Drop path, the /2 path and remat under differentiation: finite gradients, and the
    same ones with and without remat ("full" for ViG, "mixer" for ViG-H)."""
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    labels = jnp.array([1, 3])

    def grads(name, **kw):
        model = create_model(name, img_size=32, num_classes=5, seed=3, **kw)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

        return jax.jit(jax.grad(loss))(params)

    g, g_remat = grads(PLAIN, depth=1), grads(PLAIN, depth=1, remat="full")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    hier = dict(depths=(2,), dims=32, num_heads=(1,))
    for a, b in zip(jax.tree.leaves(grads(HIER, **hier)), jax.tree.leaves(grads(HIER, **hier, remat="mixer"))):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    model = create_model(PLAIN, img_size=32, depth=2, drop_path_rate=0.5)
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(a, b)  # drop path draws anew each call


def test_runs_of_tokens_are_the_whole_sequence(monkeypatch):
    """In eval mode, past ``RUN_ELEMENTS``, a block's token-wise parts (the mixer's gate,
    norms and output projection; the MLP) run over runs of tokens, so one run's temporaries
    are live at a time: the same logits and gradients as in one run, with a shorter last run,
    the loop there. In training and in export mode the whole sequence is one run (no loop)."""
    import vim_jax.models.vig as vig

    x = jax.random.normal(jax.random.key(4), (2, 96, 96, 3))  # 6 x 6 = 36 tokens

    def run(elements, mode="eval"):
        monkeypatch.setattr(vig, "RUN_ELEMENTS", elements)
        model = create_model(PLAIN, img_size=96, depth=1, num_classes=5, seed=5)
        if mode == "train":
            model.train()
        if mode == "export":
            model.set_attributes(portable=True)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, r):
            logits = nnx.merge(graphdef, p, r)(x)
            return jnp.sum(logits ** 2), logits

        lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(params, rest)
        loops = lowered.as_text().count("stablehlo.while")
        if mode != "eval":
            return loops
        grads, logits = lowered.compile()(params, rest)
        return logits, grads, loops

    whole, g_whole, loops_whole = run(1 << 20)
    runs, g_runs, loops_runs = run(10 * 768)  # runs of 10 and 7 tokens: 6 and 1 left over
    assert loops_runs >= loops_whole + 2 * 2, (loops_whole, loops_runs)  # 2 parts, and back
    np.testing.assert_allclose(runs, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_runs), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert run(10 * 768, "train") == loops_whole
    assert run(10 * 768, "export") == run(1 << 20, "export")  # export: a GLA call a direction


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['scan_backend'\] for vig_tiny_patch16_224"):
        create_model(PLAIN, scan_backend="auto")
    with pytest.raises(ValueError, match=r"remat='layer' is not one of \('none', 'mixer', 'full'\)"):
        create_model(HIER, img_size=64, depths=(1, 1), remat="layer")
    with pytest.raises(ValueError, match="gla_backend='fast' is not one of"):
        create_model(PLAIN, img_size=64, depth=1, gla_backend="fast")
    model = create_model(HIER, img_size=64, depths=(1, 1))
    with pytest.raises(ValueError, match=r"image size \(16, 16\) is smaller than the patch size 32"):
        model(jnp.zeros((1, 16, 16, 3)))


def test_features_and_dense_outputs(plain):
    """Shapes by tracing (no compilation); the out_norms' normalisation on a one-stage model."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    def shapes(name, fn, **kw):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(name, **kw)))
        out = jax.eval_shape(lambda s, x: fn(nnx.merge(graphdef, s), x), state, x)
        return jax.tree.map(lambda a: a.shape, out)

    assert shapes(PLAIN, lambda m, x: m(x), img_size=64, depth=2, num_classes=0) == (1, 192)
    maps = shapes(PLAIN, lambda m, x: m.forward_intermediates(x, (0, -1), norm=True), img_size=64, depth=2)
    assert maps == [(1, 4, 4, 192)] * 3
    kw = dict(img_size=64, dims=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=0)
    assert shapes(HIER, lambda m, x: m(x), **kw) == (1, 256)
    kw["out_norms"] = True  # the dense backbone: out norms in place of the classifier
    with pytest.raises(ValueError, match="dense backbone.*call forward_intermediates"):
        shapes(HIER, lambda m, x: m(x), **kw)
    with pytest.raises(ValueError, match="pass num_classes=0, not 10"):
        create_model(HIER, **{**kw, "num_classes": 10})
    x = jax.ShapeDtypeStruct((1, 128, 96, 3), jnp.float32)
    assert shapes(HIER, lambda m, x: m.forward_intermediates(x), **kw) == [
        (1, 32, 24, 32), (1, 16, 12, 64), (1, 8, 6, 128), (1, 4, 3, 256)]
    one = create_model(HIER, img_size=32, dims=16, depths=(1,), num_heads=(1,), num_classes=0, out_norms=True)
    (out,) = one.forward_intermediates(jnp.ones((1, 32, 32, 3)))
    # Normed per position over channels (out_norms start as the identity LayerNorm).
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out).std(-1), 1, atol=1e-2)
