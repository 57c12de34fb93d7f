"""Exports a Vim classifier, weights included, as a serialized ``jax.export`` artifact.

    python -m vim_jax.export --model vim_tiny_patch16_224 --pretrained True \\
        --batch 8 --img-size 224 --platforms cpu,cuda vim_tiny.jaxexport

The artifact is StableHLO of ``images (batch, H, W, 3) float32 -> logits (batch, classes)``
with the parameters inside; ``vim_jax.load_exported(path)`` returns a function that runs
it with no model code. It needs a jax that reads the serialization version it was written
with (jax keeps reading older versions for a while; this project tests 0.10.2). A CUDA
artifact holds the Pallas Triton kernels, compiled for the GPU it is loaded on.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "cuda", "tpu", "rocm")
_TRITON = "__gpu$xla.gpu.triton"


def cuda_target(mesh=None, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """A context in which a program lowers for CUDA on a host without a GPU.

    From jax 0.11 a Triton pallas_call asks at lowering which GPU it compiles for; a host
    without one names it with an abstract device on an abstract mesh of the program's mesh
    shape (``mesh``, default one device), which earlier versions accept as well.
    """
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    sizes, names = (mesh.axis_sizes, mesh.axis_names) if mesh is not None else ((1,), ("gpu",))
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(
        AbstractMesh(sizes, names, (AxisType.Explicit,) * len(names), abstract_device=device))


def export_model(model, *, batch: int, img_size: int, platforms=("cpu",)) -> jax.export.Exported:
    """``jax.export`` of ``model``'s logits on (batch, img_size, img_size, 3) images."""
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad:
        raise ValueError(f"unknown platform(s) {bad}; choose from {PLATFORMS}")
    fn = jax.jit(lambda images: model(images))
    spec = jax.ShapeDtypeStruct((batch, img_size, img_size, 3), jnp.float32)
    needs_gpu_name = "cuda" in platforms and not any(d.platform == "gpu" for d in jax.devices())
    with cuda_target() if needs_gpu_name else contextlib.nullcontext():
        return jax.export.export(fn, platforms=tuple(platforms),
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON)])(spec)


def load_exported(path):
    """The function stored by ``python -m vim_jax.export``: images -> logits."""
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return exported.call


def main(argv=None):
    from vim_jax import create_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="file to write the serialized artifact to")
    p.add_argument("--model", required=True, help="a name from vim_jax.list_models()")
    p.add_argument("--pretrained", default=None,
                   help="True (official weights), a .pth/.npz file or a checkpoint directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--platforms", default="cpu", help=f"comma list of {PLATFORMS}")
    args = p.parse_args(argv)
    model = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    exported = export_model(model, batch=args.batch, img_size=args.img_size,
                            platforms=args.platforms.split(","))
    out = pathlib.Path(args.out)
    out.write_bytes(exported.serialize())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {args.model}, batch {args.batch}, "
          f"{args.img_size}x{args.img_size}, platforms {','.join(exported.platforms)}, "
          f"{exported.out_avals[0].shape} logits")


if __name__ == "__main__":
    main()
