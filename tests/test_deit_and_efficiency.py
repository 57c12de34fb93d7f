"""The DeiT baseline and the efficiency benchmark's measurement on tiny configurations."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.models.deit import create_deit

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "efficiency.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("efficiency", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deit_any_resolution():
    model = create_deit("deit_tiny_patch16_224", depth=2, num_classes=5)
    for size in (32, 48):
        x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
        assert model(x).shape == (2, 5) and model.forward_features(x).shape == (2, 192)
    with pytest.raises(ValueError, match="unknown DeiT model"):
        create_deit("deit_huge")


def test_deit_attention_matches_naive_softmax():
    model = create_deit("deit_tiny_patch16_224", depth=1, num_classes=3, img_size=32)
    blk = model.blocks
    x = jax.random.normal(jax.random.key(0), (2, 5, 192))
    from flax import nnx
    graphdef, state = nnx.split(blk)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    h = block.norm1(x)
    q, k, v = jnp.split(block.qkv(h).reshape(2, 5, 3, 3, 64), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1)
    naive = x + block.proj(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(2, 5, 192))
    naive = naive + block.fc2(jax.nn.gelu(block.fc1(block.norm2(naive)), approximate=False))
    np.testing.assert_allclose(block(x), naive, atol=1e-5)


def test_measure_and_ratios():
    bench = load_bench()
    rows = [bench.measure(m, 32, "infer", 1, 1, "float32") for m in ("vim_tiny", "deit_tiny")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["img_s"] > 0 and r["peak_mb"] > 0 and r["tokens"] == 5
    (ratio,) = bench.ratios(rows, "infer")
    assert ratio["speed_ratio"] == round(rows[0]["img_s"] / rows[1]["img_s"], 2)
    oom = dict(rows[1], status="OOM")
    assert "OOM" in bench.ratios([rows[0], oom], "infer")[0]["note"]
    # ViG-T (no class token) beside them, and a train step (whose state is donated) timed twice.
    vig = bench.measure("vig_tiny", 32, "infer", 1, 1, "float32", 1)
    assert vig["status"] == "ok" and vig["tokens"] == 4
    assert [r["pair"] for r in bench.ratios(rows + [vig], "infer")] == ["vim_tiny/deit_tiny", "vig_tiny/deit_tiny"]
    train = bench.measure("vig_tiny", 32, "train", 2, 2, "float32", 1)
    assert train["status"] == "ok" and train["img_s"] > 0, train
