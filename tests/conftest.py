"""Shared test fixtures: the golden files of the official implementation (``tests/fixtures``)
and the run's compilation cache."""

import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config):
    """One XLA compilation cache for the test run, shared by the xdist workers and the
    subprocesses tests start (they inherit the environment): many tests build and step the
    same small models, whose programs then compile once per run. A fresh directory each
    run, removed at its end, so no run depends on an earlier one; a JAX_COMPILATION_CACHE_DIR
    already set is used as it is."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    cache = tempfile.mkdtemp(prefix="vim_jax_test_xla_cache_")
    config.stash[_CACHE_KEY] = cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if "jax" in sys.modules:  # already imported: it has read its environment
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    cache = config.stash.get(_CACHE_KEY, None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


_CACHE_KEY = pytest.StashKey[str]()


def fixture_path(name: str) -> pathlib.Path:
    """A golden file of ``tests/fixtures``; a missing one fails the test (it ships with the
    repository: a parity test never skips)."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"golden fixture {path} is missing from the checkout (tests/fixtures/README.md "
                    "lists them)")
    return path


@pytest.fixture(scope="session")
def scan_ref():
    return dict(np.load(fixture_path("selective_scan_ref.npz")))


@pytest.fixture(scope="session")
def vim_io():
    return dict(np.load(fixture_path("vim_tiny_d4_io.npz")))


@pytest.fixture(scope="session")
def vim_weights_path():
    """The official-format checkpoint of the Vim fixture model (``{"model": state_dict}``)."""
    return fixture_path("vim_tiny_d4.pth")


@pytest.fixture(scope="session")
def vim_weights_npz(tmp_path_factory):
    """The same state dict as an ``.npz`` of official names (a format create_model reads)."""
    from vim_jax.weights.formats import load_state_dict

    path = tmp_path_factory.mktemp("npz") / "vim_tiny_d4_weights.npz"
    np.savez(path, **load_state_dict(fixture_path("vim_tiny_d4.pth")))
    return path


def write_image_folder(root: pathlib.Path, *, classes: int = 3, per_class: int = 8,
                       splits=("train", "val"), size=(20, 24), fmt: str = "JPEG") -> pathlib.Path:
    """An ImageNet-style folder of real encoded images whose class is its dominant colour,
    so a model can learn it in a few steps."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.eye(3)[np.arange(classes) % 3] * 200 + 30
    for split in splits:
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = colours[c] + rng.normal(0, 25, size + (3,))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    d / f"img_{i:03d}.{fmt}", format="JPEG" if fmt == "JPEG" else fmt)
    return root


def tiny_config(data_dir, **over):
    """The digits demo config shrunk to a model that compiles and steps in seconds."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs.digits import get_config

    c = get_config()
    c.model.num_classes = 0  # from the dataset
    c.model.overrides.embed_dim = 32
    c.model.overrides.depth = 2
    c.data.name = "folder"
    c.data.data_dir = str(data_dir)
    c.data.eval_split = "val"
    c.data.image_size = 16
    c.optim.batch_size = 8
    c.optim.epochs = 2
    c.optim.warmup_epochs = 0
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.train.eval_every_epochs = 100
    for key, value in over.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


# bfloat16 keeps 8 significant bits: one rounding changes a value by at most u = 2^-8 of it.
BF16_U = 2.0 ** -8
# Roundings to bfloat16 on a block's path: the normed input, in_proj's x and z, the conv,
# SiLU, x_proj, dt_proj, the gated scan output, out_proj (the residual stays float32).
BF16_ROUNDINGS_PER_BLOCK = 9


def bf16_logit_tolerance(depth: int) -> float:
    """Worst case of relative rounding errors adding up unamplified through the blocks:
    (roundings per block * depth + 2 for the patch embedding and head) * u, as a fraction
    of the largest logit. Independent roundings mostly cancel, so measured errors are a
    few u (depth 2-8: 2.5u-3.7u) against this bound's 20u-74u."""
    return (BF16_ROUNDINGS_PER_BLOCK * depth + 2) * BF16_U


NO_GPU_INFO = "No supported GPU devices found"


def lower_for_cuda(traced, mesh=None):
    """``traced.lower`` for CUDA on this CPU-only host (``vim_jax.export.cuda_target``); a
    jax whose Pallas lowering still finds no GPU skips the test, saying so."""
    from vim_jax.export import cuda_target

    try:
        with cuda_target(mesh):
            return traced.lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if NO_GPU_INFO not in str(e):
            raise
        import jax
        pytest.skip(f"jax {jax.__version__} cannot lower Pallas Triton kernels on a CPU host: {e}")


def triton_calls(lowered_text: str) -> list[str]:
    """The lines of a lowered program that call a Triton kernel."""
    return [line for line in lowered_text.splitlines() if "xla.gpu.triton" in line]


def triton_kernels(lowered) -> dict[str, str]:
    """The Triton IR (text) of every kernel in a program lowered for CUDA, by kernel name:
    what the GPU's Triton compiles, read back from each call's serialized module."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    kernels = {}

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.operation.attributes
                    if child.operation.name == "stablehlo.custom_call" and \
                            "xla.gpu.triton" in str(attrs["call_target_name"]):
                        config = attrs["mhlo.backend_config"]
                        with lowering._new_ir_context():
                            module = ir.Module.parse(config["ir"].value_bytes)
                        kernels[ir.StringAttr(config["name"]).value] = module.operation.get_asm()
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return kernels


@pytest.fixture(params=["tile", "lanes"])
def scan_layout(request, monkeypatch):
    """Runs a test on each layout of the Pallas scan kernels ($VIM_JAX_SCAN_LAYOUT, read
    where a launch configuration is chosen), and fails it if no kernel ran in that layout."""
    from vim_jax.kernels import selective_scan as kernels

    monkeypatch.setenv("VIM_JAX_SCAN_LAYOUT", request.param)
    used = []
    check = kernels.check_config
    monkeypatch.setattr(kernels, "check_config", lambda kernel, cfg: used.append(cfg.layout) or check(kernel, cfg))
    yield request.param
    assert request.param in used, f"no scan kernel ran in the {request.param} layout (ran: {set(used)})"


def set_gla_form(monkeypatch, two_phase: bool) -> list:
    """Makes the Pallas GLA kernels run as one walk or in two phases
    (``kernels.gla.Config.two_phase``, forward and backward); returns a list that grows by
    one each time a kernel's configuration is chosen (at trace time)."""
    from vim_jax.kernels import gla

    used = []
    default = gla.default_config

    def config(dk, dv, kernel):
        used.append(two_phase)
        return default(dk, dv, kernel)._replace(two_phase=two_phase)

    monkeypatch.setattr(gla, "default_config", config)
    return used


@pytest.fixture(params=["one walk", "two phases"])
def gla_form(request, monkeypatch):
    """Runs a test on both forms of the Pallas GLA kernels, and fails it if no kernel ran."""
    used = set_gla_form(monkeypatch, request.param == "two phases")
    yield request.param
    assert used, f"no Pallas GLA kernel ran ({request.param})"


# TPU interpret mode as the TPU kernels' tests run it: uninitialised memory reads as NaN; the
# "parallel" grid axes run in a shuffled order, so a carried axis wrongly marked parallel
# shows; reads out of bounds raise.
def tpu_interpret():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams(uninitialized_memory="nan", random_seed=7, out_of_bounds_reads="raise")


@pytest.fixture
def tpu_kernels():
    """backend="pallas" on the CPU runs both mixers' Mosaic (TPU) kernels in TPU interpret
    mode for the test (the CPU's default there is the Triton kernels' interpret mode);
    yields a list that grows by one stage name each time a TPU kernel is traced: "forward"
    or "backward" for the GLA's, "scan forward" or "scan backward" for the scan's."""
    from vim_jax.kernels import gla_tpu, selective_scan_tpu
    from vim_jax.mixers.tpu_interpret import run_tpu_kernels_on_cpu

    used = []
    originals = {(module, stage): getattr(module, stage) for module in (gla_tpu, selective_scan_tpu)
                 for stage in ("forward", "backward")}

    def recorded(module, stage):
        name = stage if module is gla_tpu else "scan " + stage

        def run(*args, **kw):
            used.append(name)
            return originals[module, stage](*args, **kw)
        return run

    undo = run_tpu_kernels_on_cpu(tpu_interpret())
    for module, stage in originals:
        setattr(module, stage, recorded(module, stage))
    try:
        yield used
    finally:
        undo()
        for (module, stage), fn in originals.items():
            setattr(module, stage, fn)


def vig_gradients_by_remat(x) -> dict:
    """{remat: the traced gradient of a 2-block ViG-T's loss on images ``x``} for remat
    "mixer" and "full": lowered for a platform, the kernel calls they hold show whether the
    backward keeps the forward's named residuals or reruns the forward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vim_jax import create_model

    traced = {}
    for remat in ("mixer", "full"):
        model = create_model("vig_tiny_patch16_224", depth=2, img_size=x.shape[1], num_classes=3, remat=remat)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p, graphdef=graphdef, rest=rest: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)
        traced[remat] = jax.jit(jax.grad(loss)).trace(params)
    return traced
