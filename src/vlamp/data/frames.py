"""Camera frames that stay on disk: decoded once into a ``.npy`` file, read per batch.

A LeRobot dataset stores frames compressed (PNG in the data parquet, or mp4 video). Training draws
random frames every step, so decoding them per batch costs time (a few percent of a TinyVLA
step; docs/measurements.md) and decoding them all into memory costs RAM (the whole dataset, before the first step). A :class:`FrameStore` does neither: the frames are decoded
once into an uncompressed ``(N, H, W, 3)`` uint8 ``.npy`` file in the user cache (keyed by the
dataset's files, so a changed dataset is decoded again), and a batch is read with one ``preadv``
per frame into a fresh array. The reads go through the page cache, not the process's memory: the
resident set does not grow with the dataset, and a dataset larger than RAM trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from vlamp.io import write_text_atomic


class FrameStore:
    """Read-only frames of a ``.npy`` file, indexed like the array it holds.

    ``store[i]`` is one frame ``(H, W, 3)``; ``store[rows]`` (an integer array) is ``(len(rows),
    H, W, 3)``, in the order asked. Picklable (the file is reopened in the new process).

    Args:
        path: A ``.npy`` file of a C-ordered uint8 array.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{self.path}: not a C-ordered (N, H, W, C) uint8 array")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(np.uint8)
        self.frame_bytes = int(np.prod(shape[1:]))
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, rows: int | np.integer | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self._read(np.asarray([rows]))[0]
        return self._read(np.asarray(rows, dtype=np.int64).reshape(-1))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"frame index out of range for {n} frames")
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        fd = self._file()
        flat = out.reshape(len(rows), -1)
        for i, r in enumerate(rows):
            got = os.preadv(fd, [flat[i]], self.offset + int(r) * self.frame_bytes)
            if got != self.frame_bytes:
                raise OSError(f"{self.path}: short read at frame {int(r)} (the file is truncated)")
        return out

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All frames in memory (what the streaming reader exists to avoid; for small checks)."""
        arr = np.fromfile(self.path, np.uint8, offset=self.offset).reshape(self.shape)
        return arr if dtype is None else arr.astype(dtype)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"FrameStore({str(self.path)!r}, shape={self.shape})"


def store_key(root: Path, camera_key: str, files: list[Path]) -> str:
    """A name for the decoded frames of ``camera_key`` that changes when any source file does."""
    entries = [[str(root.resolve()), camera_key]]
    for f in files:
        st = f.stat()
        entries.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]


def build_store(path: Path, count: int, frame_shape: tuple[int, int, int],
                frames: Iterator[tuple[np.ndarray, np.ndarray]],
                progress: Callable[[int], None] | None = None, source: Path | None = None) -> FrameStore:
    """Writes ``count`` frames into ``path`` (a ``.npy`` file) and opens it.

    Args:
        path: Where the file goes; written under a temporary name and renamed into place, so an
            interrupted build leaves nothing that looks finished.
        count: Frames in the dataset.
        frame_shape: ``(H, W, 3)``.
        frames: ``(rows, frame)`` pairs: the decoded frame and the dataset rows (after sorting by
            ``index``) that show it. Every row must be written once.
        progress: Called with the number of rows written so far.
        source: The dataset directory, recorded beside the file (``NAME.json``): stores whose
            dataset is gone are deleted when the next one is built.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prune(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, *frame_shape)}
    frame_bytes = int(np.prod(frame_shape))
    written = np.zeros(count, bool)
    done = 0
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + count * frame_bytes)
            fd = f.fileno()
            for rows, frame in frames:
                if frame.shape != frame_shape or frame.dtype != np.uint8:
                    raise ValueError(f"a frame of shape {frame.shape} ({frame.dtype}); the dataset "
                                     f"says {frame_shape} uint8")
                data = np.ascontiguousarray(frame).reshape(-1)
                rows = np.atleast_1d(rows)
                for r in rows:
                    os.pwrite(fd, data, offset + int(r) * frame_bytes)
                written[rows] = True
                done += len(rows)
                if progress is not None:
                    progress(done)
            if not written.all():
                raise ValueError(f"{int((~written).sum())} of {count} frames were never decoded "
                                 f"(first: row {int(np.argmin(written))})")
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        if source is not None:
            write_text_atomic(path.with_suffix(".json"), json.dumps({"source": str(source.resolve())}))
    finally:
        if tmp.exists():
            tmp.unlink()
    return FrameStore(path)


def prune(directory: Path) -> list[Path]:
    """Deletes the stores in ``directory`` whose source dataset no longer exists (a temporary
    dataset's decoded frames would otherwise stay in the cache for good); returns them."""
    gone = []
    for meta in directory.glob("*.json"):
        try:
            source = Path(json.loads(meta.read_text())["source"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not source.exists():
            meta.with_suffix(".npy").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            gone.append(meta.with_suffix(".npy"))
    return gone
