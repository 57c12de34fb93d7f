"""TPU kernels on a machine without a TPU: both mixers' Mosaic kernels in Pallas's TPU
interpret mode where backend="pallas" would run the Triton kernels' interpret mode (the CPU).
For the tests and the TPU suite's rehearsal; its own module because it reaches into both
mixers' per-platform tables (``platform`` sits below them)."""

from __future__ import annotations

from vim_jax.mixers import gla, selective_scan

def run_tpu_kernels_on_cpu(interpret=None):
    """From now on, backend="pallas" on the CPU runs both mixers' TPU (Mosaic) kernels in
    Pallas's TPU interpret mode instead of the Triton kernels' interpret mode: checks of the
    TPU kernels without a TPU (the TPU suite's rehearsal, the tests). ``interpret``: a
    ``pltpu.InterpretParams``; default: uninitialised memory reads as NaN and a read out of
    bounds raises. Returns a function that undoes it."""
    from jax.experimental.pallas import tpu as pltpu

    params = interpret or pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
    tables = ((selective_scan._BACKENDS["pallas"], selective_scan._Mosaic(interpret=params)),
              (gla._PALLAS, gla._Mosaic(interpret=params)))
    before = [(table, table.get("cpu")) for table, _ in tables]
    for table, kernel in tables:
        table["cpu"] = kernel

    def undo():
        for table, old in before:
            if old is None:
                table.pop("cpu", None)
            else:
                table["cpu"] = old

    return undo
