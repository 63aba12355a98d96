"""Atomic text writes, here so that ``precision`` (which imports nothing else of vlamp) and the rest
of vlamp (:mod:`vlamp.io`) write files one way."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory, then renames it
    into place (atomic on POSIX). The temporary name is the writer's own, so processes writing
    the same file at once (a benchmark's runs loading side by side) each rename a whole file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["write_text_atomic"]
