"""Reading PyTorch checkpoints without PyTorch: the official fixture, dtypes and layouts,
and files crafted to run code on load, which must be refused."""

import io
import os
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_path
from vim_jax.weights import pth


def test_official_fixture_reads_as_the_official_state_dict(vim_io):
    """Every key the official model has, float32, in PyTorch's shapes; the model built from
    it reproduces the official logits (so every tensor's values were read right)."""
    import vim_jax
    from vim_jax.weights.names import params_to_state_dict
    from vim_jax.weights.formats import _str_keys
    from flax import nnx

    sd = pth.load(fixture_path("vim_tiny_d4.pth"))["model"]
    model = vim_jax.create_model("vim_tiny_patch16_224", depth=4, num_classes=10, img_size=64)
    pure = _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    want = params_to_state_dict(pure, cls_position=model.cls_position)
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(v.dtype == np.float32 for v in sd.values())
    loaded = vim_jax.create_model("vim_tiny_patch16_224", pretrained=str(fixture_path("vim_tiny_d4.pth")))
    x = vim_io["input_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(loaded(x), vim_io["logits"], atol=1e-4)


def _write_archive(path, pkl: bytes, storages=(), prefix="archive"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in storages:
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")


def _torch_like_pickle(obj, **entries):
    """Pickles {"model": {name: tensor}, **entries} the way torch.save does (the same globals
    and persistent ids), with stand-in torch modules: no PyTorch needed. A tensor is
    (storage array, offset, size, stride); an entry may hold such dicts of tensors too."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    torch._utils = utils

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    kinds = {np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
             np.dtype(np.int64): "LongStorage", np.dtype(np.float32): "FloatStorage"}
    for kind in kinds.values():
        setattr(torch, kind, type(kind, (), {"__module__": "torch"}))

    class Storage:
        def __init__(self, array, key):
            self.array, self.key = array, key

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, {})

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    storages = []

    def tensors(d):
        tree = {}
        for name, (array, offset, size, stride) in d.items():
            st = Storage(array, str(len(storages)))
            storages.append((st.key, array.tobytes()))
            tree[name] = Tensor(st, offset, size, stride)
        return tree

    is_tensors = lambda v: isinstance(v, dict) and v and all(isinstance(t, tuple) for t in v.values())
    top = {"model": tensors(obj), **{k: tensors(v) if is_tensors(v) else v for k, v in entries.items()}}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                return ("storage", getattr(torch, kinds[o.array.dtype]), o.key, "cpu", o.array.size)
            return None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(top)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return buf.getvalue(), storages


def test_dtypes_offsets_and_strides(tmp_path):
    """Half, bfloat16 and int64 storages; a tensor at an offset into a shared storage; a
    transposed (non-contiguous) view."""
    base = np.arange(24, dtype=np.float32)
    half = np.linspace(-2, 2, 6).astype(np.float16)
    bf16 = np.linspace(-1, 1, 4).astype(ml_dtypes.bfloat16)
    ints = np.arange(5, dtype=np.int64)
    pkl, storages = _torch_like_pickle({
        "w": (base, 0, (4, 6), (6, 1)),
        "w_t": (base, 0, (6, 4), (1, 6)),
        "tail": (base, 20, (2, 2), (2, 1)),
        "h": (half, 0, (2, 3), (3, 1)),
        "b": (bf16, 0, (4,), (1,)),
        "i": (ints, 1, (4,), (1,)),
    })
    _write_archive(tmp_path / "x.pth", pkl, storages)
    sd = pth.load(tmp_path / "x.pth")["model"]
    np.testing.assert_array_equal(sd["w"], base.reshape(4, 6))
    np.testing.assert_array_equal(sd["w_t"], base.reshape(4, 6).T)
    np.testing.assert_array_equal(sd["tail"], base[20:24].reshape(2, 2))
    assert sd["h"].dtype == np.float16 and np.array_equal(sd["h"], half.reshape(2, 3))
    assert sd["b"].dtype == ml_dtypes.bfloat16 and np.array_equal(sd["b"], bf16)
    assert sd["i"].dtype == np.int64 and np.array_equal(sd["i"], ints[1:])


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    pkl, storages = _torch_like_pickle({"w": (np.zeros(4, np.float32), 2, (4,), (1,))})
    _write_archive(tmp_path / "x.pth", pkl, storages)
    with pytest.raises(pth.UnsafeCheckpointError, match="reaches past its storage"):
        pth.load(tmp_path / "x.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["reduce", "exec"])
def test_a_file_crafted_to_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "ran"
    if how == "reduce":  # os.system through __reduce__, as in published exploits
        pkl = pickle.dumps({"model": {"w": _RunsCode(marker)}}, protocol=2)
    else:  # builtins.exec on a string, written opcode by opcode
        code = f"open({str(marker)!r}, 'w').write('x')".encode()
        pkl = (b"\x80\x02cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code + b"\x85R.")
    _write_archive(tmp_path / "evil.pth", pkl)
    with pytest.raises(pth.UnsafeCheckpointError, match="refusing to load the global"):
        pth.load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_files_that_are_not_torch_archives(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"\x80\x02}q\x00.")  # a bare (pre-1.6) pickle
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
        pth.load(tmp_path / "a.pth")
    with zipfile.ZipFile(tmp_path / "b.pth", "w") as z:
        z.writestr("something.txt", "x")
    with pytest.raises(ValueError, match="without a data.pkl"):
        pth.load(tmp_path / "b.pth")


def _flat_tensors(state_dict):
    return {k: (np.ascontiguousarray(v).ravel(), 0, v.shape, tuple(
        int(np.prod(v.shape[i + 1:])) for i in range(v.ndim))) for k, v in state_dict.items()}


def test_a_deit_style_training_checkpoint_is_read(tmp_path, vim_io):
    """What DeiT's main.py saves (Vim's recipe): model, model_ema, optimizer, scheduler,
    scaler, epoch, args (an argparse.Namespace) and NumPy scalars. The weights load, the
    EMA ones on request; the rest is read as inert data, no class imported or called."""
    import argparse

    import vim_jax

    sd = pth.load(fixture_path("vim_tiny_d4.pth"))["model"]
    ema = {k: v * 0.5 if v.dtype.kind == "f" else v for k, v in sd.items()}
    pkl, storages = _torch_like_pickle(
        _flat_tensors(sd), model_ema=_flat_tensors(ema),
        optimizer={"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.05}]},
        lr_scheduler={"last_epoch": 299}, scaler={"scale": 65536.0}, epoch=299,
        max_accuracy=np.float64(76.1), n_parameters=np.int64(7_000_000),
        args=argparse.Namespace(model="vim_tiny", lr=5e-4, input_size=224, data_set="IMNET"))
    path = tmp_path / "checkpoint.pth"
    _write_archive(path, pkl, storages)
    obj = pth.load(path)
    assert obj["args"].lr == 5e-4 and obj["args"].pickled_as == "argparse.Namespace"
    assert obj["max_accuracy"] == 76.1 and obj["n_parameters"] == 7_000_000
    x = vim_io["input_nchw"].transpose(0, 2, 3, 1)
    model = vim_jax.create_model("vim_tiny_patch16_224", pretrained=str(path))
    np.testing.assert_allclose(model(x), vim_io["logits"], atol=1e-4)
    ema_model = vim_jax.create_model("vim_tiny_patch16_224", pretrained=str(path), ema=True)
    np.testing.assert_array_equal(np.asarray(ema_model.norm_f.weight[...]), ema["norm_f.weight"])
    bare = tmp_path / "weights.pth"
    pkl, storages = _torch_like_pickle(_flat_tensors(sd))
    _write_archive(bare, pkl, storages)
    with pytest.raises(ValueError, match="has no model_ema entry .*drop ema=True"):
        vim_jax.create_model("vim_tiny_patch16_224", pretrained=str(bare), ema=True)


def test_a_record_takes_plain_attributes_only():
    record = pth._NamespaceRecord()
    record.__setstate__({"lr": 0.1, "__setstate__": print, 3: "x"})
    assert vars(record) == {"lr": 0.1} and type(record).__setstate__ is pth.PickledRecord.__setstate__


def test_a_truncated_checkpoint_says_so(tmp_path):
    data = fixture_path("vim_tiny_d4.pth").read_bytes()
    cut = tmp_path / "half.pth"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"half.pth is truncated: .*download or copy complete"):
        pth.load(cut)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth is truncated: empty"):
        pth.load(tmp_path / "empty.pth")
    damaged = tmp_path / "damaged.pth"  # its end intact, a stored tensor's bytes flipped
    blob = bytearray(data)
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"damaged.pth is damaged .*Bad CRC"):
        pth.load(damaged)
