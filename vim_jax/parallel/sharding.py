"""One data-parallel mesh over every device (all hosts), optional FSDP, global batches."""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (AXIS,))


def jit_on_mesh(mesh: Mesh, fn, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` traced and run under ``jax.set_mesh(mesh)``: code that
    works per device shard (the selective-scan kernels, see ``vim_jax.mixers.selective_scan``) sees the mesh."""
    jitted = jax.jit(fn, **jit_kwargs)

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    return call


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(AXIS))


def state_shardings(tree, mesh: Mesh, fsdp: bool, min_size: int = 2**14):
    """Shardings for a params / optimiser-state pytree: replicated, or (fsdp) each array
    split along its largest axis that the device count divides (small arrays replicated)."""
    n = mesh.shape[AXIS]

    def pick(x):
        shape = getattr(x, "shape", ())
        if not fsdp or n == 1 or int(np.prod(shape)) < min_size:
            return NamedSharding(mesh, P())
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % n == 0:
                spec = [None] * len(shape)
                spec[axis] = AXIS
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(pick, tree)


def put_global(tree, shardings):
    """Host values identical on every process -> global arrays with ``shardings``."""
    def put(x, s):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree.map(put, tree, shardings)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's numpy batch -> global arrays split over the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch(batches: Iterable[dict], sharding: NamedSharding, size: int = 2) -> Iterator[dict]:
    """Keeps ``size`` batches on device ahead of the consumer (host->device copy overlaps)."""
    queue = collections.deque()
    for local in batches:
        queue.append(global_batch(local, sharding))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
