"""Files: written so that a crash or a full disk never leaves a half-written one in place, where
vlamp's caches live, and whether a run's directory can be written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vlamp.precision.errors import VlampError
from vlamp.precision.files import write_text_atomic  # one way to write a file, precision's too


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/vlamp/KIND`` (``~/.cache/vlamp/KIND``): generated datasets, measured
    plans, decoded frames."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlamp" / kind


def check_writable(run_dir: Path) -> None:
    """Checks that a run directory (``output_dir``) can be created and written, leaving nothing
    behind: a directory is made and removed in its nearest existing ancestor (``os.access`` says
    yes to root where writing still fails, as in /proc).

    Raises:
        VlampError: One line naming the directory and why, before anything is loaded.
    """
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".vlamp-probe-", dir=existing))
    except OSError as e:
        raise VlampError(f"output_dir {str(run_dir)!r} cannot be written: "
                         f"{e.strerror or e}; choose another output_dir") from None


def write_json(obj: Any, path: str | os.PathLike[str], compact: bool = False) -> None:
    """``obj`` as JSON (indented, or on one line with ``compact``), written atomically."""
    write_text_atomic(path, json.dumps(obj, separators=(",", ":")) if compact else
                      json.dumps(obj, indent=1))


__all__ = ["cache_dir", "check_writable", "write_json", "write_text_atomic"]
