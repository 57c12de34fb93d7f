"""Exports a classifier (Vim, ViG or ViG-H), weights included: a ``jax.export`` artifact or an
ONNX model.

    python -m vim_jax.export --model vim_tiny_patch16_224 --pretrained True \\
        --batch 8 --img-size 224 --platforms cpu,cuda vim_tiny.jaxexport
    python -m vim_jax.export --pretrained ckpts/mine --img-size 224 mine.jaxexport   # the name it records
    python -m vim_jax.export --format onnx --model vim_tiny_patch16_224 --pretrained True \\
        --batch 8 --img-size 224 vim_tiny.onnx

The ``jax.export`` artifact (the default format) is StableHLO of ``images (batch, H, W, 3) float32 -> logits (batch, classes)``
with the parameters inside; ``vim_jax.load_exported(path)`` returns a function that runs
it with no model code. It needs a jax that reads the serialization version it was written
with (jax keeps reading older versions for a while; this project tests 0.10.2). A CUDA
artifact holds the Pallas Triton kernels, compiled for the GPU it is loaded on.

The ONNX model (``pip install -e '.[onnx]'``: jax2onnx converts, ONNX Runtime checks) maps
``images (batch, H, W, 3) float32 -> logits`` with the batch dimension dynamic; it is the
model traced in its export mode (``portable``: standard operations only). The command runs
it in ONNX Runtime on ``--batch`` images and prints the largest difference from JAX.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from vim_jax.weights.files import atomic_write

PLATFORMS = ("cpu", "cuda", "tpu", "rocm")
FORMATS = ("jax", "onnx")
ONNX_TOLERANCE = 1e-4  # largest logit difference from JAX the export command accepts
_ONNX_EXTRA = "ONNX export needs the onnx extra: pip install -e '.[onnx]' (jax2onnx, onnxruntime)"
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


@contextlib.contextmanager
def export_mode(model):
    """``model`` in its export mode for the duration (``portable``: standard operations
    only), then back in the mode it was in."""
    before = model.portable
    model.set_attributes(portable=True)
    try:
        yield model
    finally:
        model.set_attributes(portable=before)


def export_onnx(model, path, *, img_size: int, opset: int = 23) -> pathlib.Path:
    """Writes ``model`` as an ONNX file: ``images`` (batch, img_size, img_size, 3) float32
    -> ``logits`` (batch, classes), weights included, batch dynamic. Returns the path."""
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(_ONNX_EXTRA) from e
    # onnx_ir warns once per shape constant it leaves untyped, harmlessly: keep the output readable.
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    with export_mode(model), warnings.catch_warnings():
        # jax2onnx's own Flax plugins read ``Variable.value``, which Flax deprecates.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="jax2onnx")
        proto = to_onnx(lambda images: model(images), inputs=[("batch", img_size, img_size, 3)],
                        input_names=["images"], output_names=["logits"],
                        model_name=getattr(model, "config", {}).get("name", "vim"), opset=opset)
    return atomic_write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))


def onnx_session(path, *, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path``; ``threads`` caps its intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(_ONNX_EXTRA) from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the graph optimiser's notes on unused constants
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_exported(path):
    """The function stored by ``python -m vim_jax.export``: images -> logits."""
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return exported.call


def main(argv=None):
    from vim_jax.weights.create import create_model
    from vim_jax.train.cli import ArgumentParser, one_line_errors, positive

    p = ArgumentParser(prog="python -m vim_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="file to write: the jax.export artifact, or the .onnx model")
    p.add_argument("--format", default="jax", choices=FORMATS,
                   help="jax: a jax.export artifact (default); onnx: an ONNX model, batch dynamic")
    p.add_argument("--model", default=None,
                   help="a name from vim_jax.list_models() (default: the one --pretrained names: a "
                        "checkpoint directory's own, or an official state dict's by its keys)")
    p.add_argument("--pretrained", default=None,
                   help="True (official weights), a .pth/.npz/.safetensors file or a checkpoint "
                        "directory")
    p.add_argument("--batch", type=positive(int), default=1)
    p.add_argument("--img-size", type=positive(int), default=224)
    p.add_argument("--platforms", default=None,
                   help=f"comma list of {PLATFORMS} (jax format only; default cpu)")
    args = p.parse_args(argv)
    if args.format == "onnx" and args.platforms:
        p.error("--platforms applies to --format jax; an ONNX model runs wherever ONNX Runtime does")
    if args.model is None and args.pretrained in (None, "True", "true"):
        p.error("--model is needed unless --pretrained is a file or directory of weights")
    with one_line_errors(p):
        model = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    args.model = model.config["name"]
    if args.format == "onnx":
        return _main_onnx(model, args)
    exported = export_model(model, batch=args.batch, img_size=args.img_size,
                            platforms=(args.platforms or "cpu").split(","))
    out = pathlib.Path(args.out)
    out.write_bytes(exported.serialize())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {args.model}, batch {args.batch}, "
          f"{args.img_size}x{args.img_size}, platforms {','.join(exported.platforms)}, "
          f"{exported.out_avals[0].shape} logits")


def _main_onnx(model, args):
    out = export_onnx(model, args.out, img_size=args.img_size)
    x = np.random.default_rng(0).normal(size=(args.batch, args.img_size, args.img_size, 3))
    x = x.astype(np.float32)
    got = onnx_session(out).run(None, {"images": x})[0]
    diff = float(np.max(np.abs(got - np.asarray(model(x)))))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {args.model}, batch dynamic, "
          f"{args.img_size}x{args.img_size}, {got.shape[1]} logits; ONNX Runtime on {args.batch} "
          f"random images: max |logit difference| vs JAX {diff:.2e}")
    if not diff <= ONNX_TOLERANCE:  # NaN fails too
        raise SystemExit(f"error: ONNX Runtime's logits differ from JAX's by {diff:.2e}, more than "
                         f"{ONNX_TOLERANCE:g}; the file {out} is not a faithful export (please "
                         "report it with the model name, jax2onnx and onnxruntime versions)")


if __name__ == "__main__":
    main()
