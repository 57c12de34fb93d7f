"""The sequence mixers both model families share, each behind one entry point that picks
its backend by the platform a program is lowered for:

- ``selective_scan``: Mamba's selective scan (Vim);
- ``gla``: one direction of gated linear attention, and ``bigla``, both directions at once
  (ViG).

Their Pallas kernels live in ``kernels/`` (imported as ``vim_jax.kernels``).
"""

from vim_jax.mixers.gla import bigla, gla
from vim_jax.mixers.selective_scan import selective_scan

__all__ = ["bigla", "gla", "selective_scan"]
