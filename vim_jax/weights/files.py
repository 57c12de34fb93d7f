"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import pathlib
from typing import Callable


def atomic_write(path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Calls ``write(tmp)`` on a sibling temporary path, then renames it onto ``path`` in
    one step (an interruption leaves the old file or none, never a partial one). The file
    gets the permissions the umask gives a new file, whatever ``write`` created it with."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
