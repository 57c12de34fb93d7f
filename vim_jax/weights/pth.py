"""Reads PyTorch checkpoints (``torch.save`` zip archives) into NumPy, without PyTorch.

A ``.pth`` file is a zip archive holding ``<name>/data.pkl`` (a pickle of the saved
object) and one raw little-endian buffer per tensor storage (``<name>/data/<key>``).
Unpickling an arbitrary pickle can run arbitrary code, so this reader rebuilds only what
a state dict is made of: dicts, ``OrderedDict``, tensors (``torch._utils._rebuild_tensor_v2``,
``_rebuild_parameter``) over typed storages; and, for the training checkpoints DeiT-style
``main.py`` scripts save beside the weights, inert stand-ins for plain data holders: an
``argparse.Namespace`` becomes a ``PickledRecord`` of its attributes, NumPy scalars are
decoded from their bytes. The real classes are never imported or called. Any other global
in the pickle is refused with ``UnsafeCheckpointError`` before anything is called: safe on
untrusted files.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import re
import zipfile
import zlib

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


class PickledRecord:
    """An inert stand-in for a plain data-holding object in a checkpoint (``argparse.Namespace``):
    its pickled attributes, nothing else; ``pickled_as`` names the class it stood for."""

    pickled_as = ""

    def __setstate__(self, state):
        # Plain attribute names only: a pickled "__setstate__" would make the next BUILD call it.
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items()
                                  if isinstance(k, str) and not k.startswith("__")})

    def __repr__(self):
        return f"PickledRecord[{self.pickled_as}]({vars(self)})"


class _NamespaceRecord(PickledRecord):
    pickled_as = "argparse.Namespace"


class _DTypeRecord:
    """The stand-in for ``numpy.dtype(code, align, copy)`` in a pickled NumPy scalar."""

    def __init__(self, code, align=False, copy=True):
        if not (isinstance(code, str) and re.fullmatch(r"[biufc][0-9]{1,2}", code)):
            raise UnsafeCheckpointError(f"a pickled NumPy scalar of dtype {code!r:.40}: only "
                                        "numbers and booleans are read")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DTypeRecord) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("a pickled NumPy scalar that is not a number")
    if len(data) != dtype.dtype.itemsize:
        raise UnsafeCheckpointError(f"a pickled NumPy {dtype.dtype} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype.dtype, count=1)[0]


def _encode(text, encoding="latin1"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with {encoding!r:.20}: only latin1 is read")
    return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): _NamespaceRecord,
    ("numpy", "dtype"): _DTypeRecord,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _encode,
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
            "should hold only tensors, dicts, numbers and argparse namespaces, and unpickling other "
            "objects can run code. If you trust the file, extract its weights with PyTorch: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth').")

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
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04" or not head:  # a zip archive's start without its end, or nothing
            what = "a zip archive without its end" if head else "empty"
            raise ValueError(f"{path} is truncated: {what} ({path.stat().st_size:,} bytes). Was the "
                             "download or copy complete? Fetch it again.")
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (torch.save's format since "
                         "PyTorch 1.6); re-save it with a recent PyTorch, or convert it to .npz")
    try:
        return _load_archive(path)
    except UnsafeCheckpointError as e:
        if str(path) in str(e):
            raise
        raise UnsafeCheckpointError(f"{path}: {e}") from e
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}). Was the download or "
                         "copy complete? Fetch it again.") from e


def _load_archive(path):
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
