"""Files: written so that a crash or a full disk never leaves a half-written one in place, and
where vlamp's caches live."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory, then renames it
    into place (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/vlamp/KIND`` (``~/.cache/vlamp/KIND``): generated datasets, measured
    plans, decoded frames."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlamp" / kind
