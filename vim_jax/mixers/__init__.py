"""The sequence mixers both model families share, each behind one entry point that picks
its backend by the platform a program is lowered for:

- ``selective_scan.selective_scan``: Mamba's selective scan (Vim);
- ``gla.gla``: one direction of gated linear attention, and ``gla.bigla``, both directions at
  once (ViG).

The functions are also ``vim_jax.selective_scan`` and ``vim_jax.gla``. (This package does not
re-export them: the names would hide the modules.) Their Pallas kernels live in ``kernels/``
(imported as ``vim_jax.kernels``).
"""
