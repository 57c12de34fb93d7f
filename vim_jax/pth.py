"""Reads PyTorch checkpoints (``torch.save`` zip archives) into NumPy, without PyTorch.

A ``.pth`` file is a zip archive holding ``<name>/data.pkl`` (a pickle of the saved
object) and one raw little-endian buffer per tensor storage (``<name>/data/<key>``).
Unpickling an arbitrary pickle can run arbitrary code, so this reader rebuilds only what
a state dict is made of: dicts, ``OrderedDict``, tensors (``torch._utils._rebuild_tensor_v2``,
``_rebuild_parameter``) over typed storages. Any other global in the pickle is refused
with ``UnsafeCheckpointError`` before anything is called: safe on untrusted files.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np

# torch's typed storages -> the NumPy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def is_floating(dtype) -> bool:
    """float16/32/64 or bfloat16 (which NumPy does not count as floating)."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == ml_dtypes.bfloat16


class UnsafeCheckpointError(ValueError):
    """The pickle inside a checkpoint asks for something other than tensors and dicts."""


class _StorageType:
    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    """A tensor as a NumPy array copied out of its storage (a 1-D array of its elements)."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise UnsafeCheckpointError(f"a tensor of size {size}, stride {stride} at offset "
                                    f"{storage_offset} reaches past its storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride])
    return view.copy()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load the global {module}.{name} from its pickle: a checkpoint "
            "should hold only tensors and dicts, and unpickling other objects can run code. If "
            "you trust the file, convert it with PyTorch: torch.save(torch.load(f)['model'], ...).")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.path}: unexpected persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        data = self.archive.read(f"{self.prefix}/data/{key}")
        if len(data) < numel * storage_type.dtype.itemsize:
            raise ValueError(f"{self.path}: storage {key} holds {len(data)} bytes, fewer than its "
                             f"{numel} elements of {storage_type.dtype}")
        return np.frombuffer(data, dtype=storage_type.dtype.newbyteorder("<"), count=numel)


def load(path):
    """The object saved in a ``torch.save`` zip archive, its tensors as NumPy arrays."""
    path = pathlib.Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (torch.save's format since "
                         "PyTorch 1.6); re-save it with a recent PyTorch, or convert it to .npz")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path} is a zip archive without a data.pkl: not a PyTorch checkpoint")
        prefix = pickles[0].rpartition("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as f:
            return _Unpickler(f, archive, prefix, path).load()
