"""The reference selective scan against the official implementation's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax import scan as ss

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def channels_last(ref):
    """Fixture arrays (official channels-first layout) -> this project's layout."""
    out = {}
    for k in NAMES:
        x = ref[k]
        out[k] = jnp.asarray(x.transpose(0, 2, 1) if x.ndim == 3 else x)
    return out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def test_forward_matches_official(scan_ref):
    args = channels_last(scan_ref)
    out, last = ss.selective_scan(**args, delta_softplus=True, return_last_state=True,
                                  backend="reference")
    assert rel_err(out, scan_ref["out"].transpose(0, 2, 1)) < 1e-4
    assert rel_err(last, scan_ref["last_state"]) < 1e-4


def test_all_gradients_match_official(scan_ref):
    args = channels_last(scan_ref)
    cot = jnp.asarray(scan_ref["cotangent"].transpose(0, 2, 1))

    def loss(args):
        return jnp.sum(ss.selective_scan(**args, delta_softplus=True, backend="reference") * cot)

    grads = jax.grad(loss)(args)
    for k in NAMES:
        want = scan_ref[f"grad_{k}"]
        got = np.asarray(grads[k])
        if got.ndim == 3:
            got = got.transpose(0, 2, 1)
        assert rel_err(got, want) < 1e-4, k
