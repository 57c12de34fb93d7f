"""Winners files: the launch configurations a GPU's sweep found fastest, by kernel and
shape, so that later runs (the GPU suite's later stages) use them. JSON, one entry a
shape: {"fwd,384,128,197": [32, 1, 1, 1, "lanes"]}, the kernel and its integer shape, then
the configuration's fields in order."""

from __future__ import annotations

import json
import os
import warnings


def load(path: str, config_type, variable: str) -> dict:
    """{(kernel, *shape): config_type(*fields)} from the winners file at ``path`` (named by
    the environment ``variable``); a file that cannot be read is reported and gives {} (the
    defaults then apply)."""
    try:
        with open(path) as f:
            entries = json.load(f)
        return {(kernel, *map(int, shape)): config_type(*fields)
                for (kernel, *shape), fields in ((k.split(","), v) for k, v in entries.items())}
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"{variable}={path}: not a sweep's winners file ({e}); using the defaults")
        return {}


def save(path: str, winners: dict) -> None:
    """Writes ``winners`` in the format ``load`` reads, whole or not at all (a write cut off
    midway leaves the previous file)."""
    with open(path + ".tmp", "w") as f:
        json.dump({",".join(map(str, key)): list(cfg) for key, cfg in winners.items()}, f, indent=1)
    os.replace(path + ".tmp", path)


def from_environment(variable: str, config_type) -> dict:
    """The winners file named by ``variable``, if it is set."""
    path = os.environ.get(variable)
    return load(path, config_type, variable) if path else {}
