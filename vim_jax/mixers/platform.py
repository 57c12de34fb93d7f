"""How the mixers run a kernel per platform, and per shard under a mesh.

The selective scan and gated linear attention share this: one traced program carries each
platform's kernel (``dispatch``, ``jax.lax.platform_dependent``), a Triton kernel is lowered
only for CUDA even when the program is lowered for several platforms at once
(``lowered_only_for``, ``run_kernel``), and under a mesh with a ``data`` axis each device
runs its kernel on its own share of the batch (``per_shard``): a pallas_call is opaque to
XLA's partitioner.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec as P

from vim_jax.parallel.sharding import AXIS


def dispatch(branches: dict, *args):
    """``branches[platform](*args)`` for the platform the program is lowered for
    (keys: platform names and "default")."""
    return jax.lax.platform_dependent(*args, **branches)


def per_shard(fn, args, *, replicated=(), summed=()):
    """``fn(*args)``, run on each device's share of the batch (axis 0) under a mesh with a
    ``data`` axis, else as is. Arguments at the ``replicated`` positions are whole on every
    device; outputs at the ``summed`` positions are per-shard partial sums, added up here;
    every other output is split along the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty or AXIS not in mesh.axis_names or AXIS in mesh.manual_axes \
        else mesh.shape[AXIS]
    if shards == 1 or args[0].shape[0] % shards:
        return fn(*args)
    in_specs = tuple(P() if i in replicated else P(AXIS) for i in range(len(args)))

    def body(*a):
        return tuple(o[None] if i in summed else o for i, o in enumerate(fn(*a)))

    # One spec for every output (a prefix of the output tuple); check_vma=False: a
    # pallas_call's outputs carry no varying-axes type.
    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS), check_vma=False)(*args)
    return tuple(o.sum(0) if i in summed else o for i, o in enumerate(out))


def lowered_only_for(platform: str | None, fn, *args, op: str):
    """fn(*args) as one primitive that lowers fn only for ``platform``.

    A Triton pallas_call cannot be lowered for the CPU, yet a program lowered for
    ("cpu", "cuda") (``jax.export``) lowers every platform's branch of a
    platform_dependent for every platform. Elsewhere this lowers to zeros, which the
    platform_dependent around it never selects; with platform None it is an error that
    names ``op`` (the mixer asked for its Pallas backend where it has no kernel).
    """
    flat, in_tree = jax.tree.flatten(args)
    out = jax.eval_shape(fn, *args)
    flat_out, out_tree = jax.tree.flatten(out)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    outs = _platform_kernel_p.bind(*flat, fn=flat_fn, platform=platform, op=op,
                                   avals=tuple(jax.core.ShapedArray(a.shape, a.dtype) for a in flat_out))
    return jax.tree.unflatten(out_tree, outs)


def run_kernel(module: str, stage: str, target: str | None, interpret, args, *, op: str, **kw):
    """``vim_jax.kernels.<module>.<stage>(*args, interpret=interpret, **kw)``: run as it is
    in interpret mode (the CPU), else lowered only for ``target`` (``lowered_only_for``)."""
    kernels = importlib.import_module(f"vim_jax.kernels.{module}")
    fn = functools.partial(getattr(kernels, stage), interpret=interpret, **kw)
    return fn(*args) if interpret else lowered_only_for(target, fn, *args, op=op)


_platform_kernel_p = jex_core.Primitive("platform_kernel")
_platform_kernel_p.multiple_results = True
_platform_kernel_p.def_abstract_eval(lambda *args, fn, platform, op, avals: avals)


def _lowering_for(target: str | None):
    """The primitive's lowering rule on ``target`` (None: any platform not named): ``fn``
    where it is the kernel's platform; elsewhere zeros (never selected by the
    platform_dependent around it) or, for a call made for no platform, an error naming
    the platform."""

    def rule(ctx, *args, fn, platform, op, avals):
        if target is not None and platform == target:
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
        if platform is None:
            where = target or ", ".join(ctx.module_context.platforms)
            raise NotImplementedError(
                f"{op}(backend='pallas') has no kernel for platform {where}: its Pallas "
                "kernels are written for CUDA GPUs (Triton) and TPUs (Mosaic), "
                "and run on the CPU in interpret mode. Use backend='auto' (the XLA form there) or "
                "another backend.")
        zeros = lambda *_: [jnp.zeros(a.shape, a.dtype) for a in avals]
        return mlir.lower_fun(zeros, multiple_results=True)(ctx, *args)

    return rule


for _target in ("cpu", "cuda", "rocm", "tpu"):
    mlir.register_lowering(_platform_kernel_p, _lowering_for(_target), platform=_target)
mlir.register_lowering(_platform_kernel_p, _lowering_for(None))


def _eager(*args, fn, platform, op, avals):
    # Outside jit, platform_dependent runs the chosen branch eagerly: compile the primitive
    # for the devices the arguments are on, as any eager jax op is (under disable_jit,
    # where that jit would bind this primitive again, run the kernel's function itself).
    if jax.config.jax_disable_jit:
        return fn(*args)
    return jax.jit(lambda *a: _platform_kernel_p.bind(*a, fn=fn, platform=platform, op=op,
                                                      avals=avals))(*args)


_platform_kernel_p.def_impl(_eager)


def _kernel_batching(args, dims, *, fn, platform, op, avals):
    # vmap of a mixer (every platform's branch is traced, this one included): vmap fn.
    vfn = jax.vmap(lambda *a: list(fn(*a)), in_axes=tuple(dims))
    out = jax.eval_shape(vfn, *args)
    outs = _platform_kernel_p.bind(*args, fn=vfn, platform=platform, op=op,
                                   avals=tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in out))
    return outs, [0] * len(outs)


batching.primitive_batchers[_platform_kernel_p] = _kernel_batching
