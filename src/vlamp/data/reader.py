"""Reads a LeRobot v3.0 dataset (ours or a user's) into arrays, checking it on the way in.

Cameras may be image features (PNG bytes in the data parquet) or video features (mp4 files decoded
with PyAV). Frames are decoded into memory, or (``stream=True``) once into a file in the user
cache that batches are read from (:mod:`vlamp.data.frames`); either way through one decoder per
source, so the two hold the same bytes. Every problem a user can cause — a directory that is not
such a dataset, a missing file, a corrupted parquet, NaN in a column — is a :class:`VlampError`
that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlamp.data.frames import FrameStore, build_store, store_key
from vlamp.data.lerobot import ACTION_KEY, CODEBASE_VERSION, STATE_KEY
from vlamp.io import cache_dir
from vlamp.precision.errors import VlampError

Frames = Iterator[tuple[np.ndarray, np.ndarray]]  # (dataset rows, the frame they show)


@dataclasses.dataclass
class LeRobotData:
    """A dataset: one row per frame; ``images`` is (N, H, W, 3) uint8, an array in memory or a
    :class:`~vlamp.data.frames.FrameStore` read per batch (``stream=True``)."""

    root: Path
    info: dict[str, Any]
    stats: dict[str, Any]
    tasks: list[str]
    camera_key: str
    images: np.ndarray | FrameStore
    state: np.ndarray
    action: np.ndarray
    episode_index: np.ndarray
    frame_index: np.ndarray
    task_index: np.ndarray

    @property
    def memory_bytes(self) -> int:
        """Bytes of the arrays held in memory (frames left on disk by ``stream=True`` count 0)."""
        arrays = [self.state, self.action, self.episode_index, self.frame_index, self.task_index]
        if isinstance(self.images, np.ndarray):
            arrays.append(self.images)
        return sum(a.nbytes for a in arrays)

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def num_episodes(self) -> int:
        return len(np.unique(self.episode_index))

    def __len__(self) -> int:
        return len(self.action)


def read_dataset(root: str | Path, camera_key: str | None = None, *, stream: bool = False,
                 progress: bool = False) -> LeRobotData:
    """Loads the dataset at ``root``.

    Args:
        root: The dataset directory (the one holding ``meta/`` and ``data/``).
        camera_key: Which image/video feature to use (default: the first one in info.json).
        stream: Leave the frames on disk: decoded once into ``$XDG_CACHE_HOME/vlamp/frames``
            (reused while the dataset's files are unchanged) and read per batch, so memory does
            not grow with the dataset. Off: decoded into memory.
        progress: A progress bar while frames are decoded.

    Raises:
        VlampError: If the directory is not a LeRobot v3.0 dataset or its files are damaged.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    name = f"{str(root)!r}"
    if not root.is_dir():
        raise VlampError(f"dataset {name}: no such directory")
    info, camera_key, data_files = _check_layout(root, name, camera_key)
    features = info["features"]
    stats = _json(root / "meta/stats.json", name)
    tasks_table = _parquet(root / "meta/tasks.parquet", name)
    task_col = "task" if "task" in tasks_table.column_names else "__index_level_0__"
    if task_col not in tasks_table.column_names or "task_index" not in tasks_table.column_names:
        raise VlampError(f"dataset {name}: meta/tasks.parquet needs task and task_index columns")
    order = np.argsort(tasks_table.column("task_index").to_numpy())
    tasks = [tasks_table.column(task_col).to_pylist()[i] for i in order]

    video = features[camera_key]["dtype"] == "video"
    columns = [STATE_KEY, ACTION_KEY, "episode_index", "frame_index", "task_index", "index"]
    import pyarrow as pa

    try:
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in data_files])
        if not video:  # the images are read apart, a slice at a time
            schema = pq.read_schema(data_files[0])
            if camera_key not in schema.names:
                raise KeyError(camera_key)
    except (pa.ArrowInvalid, OSError) as e:
        raise VlampError(f"dataset {name}: cannot read data parquet ({e})") from None
    except KeyError as e:
        raise VlampError(f"dataset {name}: data parquet lacks column {e}") from None
    order = np.argsort(table.column("index").to_numpy(), kind="stable")
    table = table.take(order)
    state = _matrix(table, STATE_KEY, name)
    action = _matrix(table, ACTION_KEY, name)
    ints = {k: table.column(k).to_numpy().astype(np.int64) for k in ("episode_index", "frame_index", "task_index")}
    if video:
        frames = _video_frames(root, info, camera_key, ints["episode_index"], ints["frame_index"], name)
        sources = _video_files(root, info, camera_key, ints["episode_index"], name)
    else:
        row_of = np.empty_like(order)
        row_of[order] = np.arange(len(order))  # file row k is dataset row row_of[k]
        frames = _png_frames(data_files, camera_key, row_of, name)
        sources = data_files
    path = cache_dir("frames") / f"{store_key(root, camera_key, sources)}.npy"
    images = _open_store(path, len(order)) if stream else None
    if images is None:  # decoded now: into memory, or into the store
        with tqdm(total=len(order), desc=f"decode {camera_key}", unit="frame",
                  disable=not progress, dynamic_ncols=True) as bar:
            images = _build(path, frames, len(order), bar, name, root) if stream else \
                _into_memory(frames, len(order), bar)
    return LeRobotData(root, info, stats, tasks, camera_key, images, state, action,
                       ints["episode_index"], ints["frame_index"], ints["task_index"])


def _check_layout(root: Path, name: str, camera_key: str | None
                  ) -> tuple[dict[str, Any], str, list[Path]]:
    """``meta/info.json``, the camera to read and the data files of a LeRobot v3.0 dataset, after
    checking its version, features and files.

    Raises:
        VlampError: Naming what is missing or wrong.
    """
    info_path = root / "meta/info.json"
    if not info_path.is_file():
        raise VlampError(f"{name} is not a LeRobot v3.0 dataset: missing meta/info.json")
    info = _json(info_path, name)
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise VlampError(f"dataset {name}: codebase_version is {version!r}; vlamp reads {CODEBASE_VERSION!r}")
    features = info.get("features") or {}
    cameras = [k for k, f in features.items() if f.get("dtype") in ("image", "video")]
    for key in (STATE_KEY, ACTION_KEY):
        if key not in features:
            raise VlampError(f"dataset {name}: info.json has no {key!r} feature")
    if not cameras:
        raise VlampError(f"dataset {name}: info.json has no image or video feature")
    camera_key = camera_key or cameras[0]
    if camera_key not in cameras:
        raise VlampError(f"dataset {name}: no camera {camera_key!r}; cameras: {', '.join(cameras)}")
    for rel in ("meta/stats.json", "meta/tasks.parquet"):
        if not (root / rel).is_file():
            raise VlampError(f"{name} is not a LeRobot v3.0 dataset: missing {rel}")
    data_files = sorted(root.glob("data/chunk-*/file-*.parquet"))
    if not data_files:
        raise VlampError(f"{name} is not a LeRobot v3.0 dataset: no data/chunk-*/file-*.parquet")
    return info, camera_key, data_files


def _json(path: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VlampError(f"dataset {name}: {path.name} is not readable JSON ({e})") from None


def _parquet(path: Path, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise VlampError(f"dataset {name}: corrupted {path.name} ({e})") from None


def _matrix(table, key: str, name: str) -> np.ndarray:
    import pyarrow as pa

    column = table.column(key).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if len(column) and values.size % len(column):
            raise VlampError(f"dataset {name}: column {key!r} has rows of different lengths")
        arr = values.reshape(len(column), -1)
    else:
        arr = column.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise VlampError(f"dataset {name}: column {key!r} has NaN/inf ({int(bad.sum())} values, "
                         f"first at frame {row})")
    return arr


def _into_memory(frames: Frames, count: int, bar: tqdm) -> np.ndarray:
    images = None
    for rows, frame in frames:
        if images is None:
            images = np.empty((count, *frame.shape), np.uint8)
        images[rows] = frame
        bar.update(np.size(rows))
    return images if images is not None else np.empty((0, 0, 0, 3), np.uint8)


def _open_store(path: Path, count: int) -> FrameStore | None:
    """The decoded frames from an earlier read, if they are there and whole."""
    try:
        store = FrameStore(path)
    except (OSError, ValueError):
        return None
    if len(store) != count or path.stat().st_size != store.offset + store.nbytes:
        return None
    return store


def _build(path: Path, frames: Frames, count: int, bar: tqdm, name: str, root: Path) -> FrameStore:
    first = next(frames, None)
    if first is None:
        raise VlampError(f"dataset {name}: no frames")

    def chained() -> Frames:
        yield first
        yield from frames

    try:
        return build_store(path, count, first[1].shape, chained(),
                           progress=lambda n: bar.update(n - bar.n), source=root)
    except ValueError as e:
        raise VlampError(f"dataset {name}: {e}") from None
    except OSError as e:
        raise VlampError(f"dataset {name}: cannot write decoded frames to {path.parent} "
                         f"({e.strerror or e}); free space there or set XDG_CACHE_HOME") from None


def _png_frames(data_files: list[Path], key: str, row_of: np.ndarray, name: str) -> Frames:
    """The PNG frames of ``key``, read from the data files a slice at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    k = 0
    for f in data_files:
        try:
            batches = pq.ParquetFile(f).iter_batches(batch_size=256, columns=[key])
            for batch in batches:
                for blob in batch.column(0).field("bytes").to_pylist():
                    try:
                        frame = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
                    except Exception as e:  # PIL raises several types for damaged images
                        raise VlampError(f"dataset {name}: image of frame {int(row_of[k])} cannot "
                                         f"be decoded ({e})") from None
                    yield row_of[k], frame
                    k += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise VlampError(f"dataset {name}: cannot read data parquet ({e})") from None


def _video_files(root: Path, info: dict[str, Any], key: str, episode_index: np.ndarray,
                 name: str) -> list[Path]:
    episodes = _episodes(root, name)
    return sorted({_video_path(root, info, key, episodes[int(ep)]) for ep in np.unique(episode_index)})


def _video_path(root: Path, info: dict[str, Any], key: str, meta: dict[str, Any]) -> Path:
    template = info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    return root / template.format(video_key=key, chunk_index=int(meta[f"videos/{key}/chunk_index"]),
                                  file_index=int(meta[f"videos/{key}/file_index"]))


def _video_frames(root: Path, info: dict[str, Any], key: str, episode_index: np.ndarray,
                  frame_index: np.ndarray, name: str) -> Frames:
    """The frames of ``key``'s videos, one video file at a time, each decoded once, front to back."""
    import av

    episodes = _episodes(root, name)
    fps = float(info["fps"])
    wanted: dict[Path, dict[int, list[int]]] = {}  # video -> frame position -> dataset rows
    for row, (ep, fr) in enumerate(zip(episode_index, frame_index)):
        meta = episodes[int(ep)]
        pos = int(round((float(meta[f"videos/{key}/from_timestamp"]) + fr / fps) * fps))
        wanted.setdefault(_video_path(root, info, key, meta), {}).setdefault(pos, []).append(row)
    for path, positions in wanted.items():
        seen = 0
        try:
            with av.open(str(path)) as container:
                for i, f in enumerate(container.decode(video=0)):
                    seen = i + 1
                    if i in positions:
                        yield np.asarray(positions[i]), f.to_ndarray(format="rgb24")
                    if seen > max(positions):
                        break
        except (av.error.FFmpegError, OSError) as e:
            raise VlampError(f"dataset {name}: cannot decode video {path.name} of {key!r} ({e})") from None
        if seen <= max(positions):
            raise VlampError(f"dataset {name}: video of {key!r} has {seen} frames, an episode "
                             f"needs frame {max(positions)}")


def _episodes(root: Path, name: str) -> dict[int, dict[str, Any]]:
    files = sorted(root.glob("meta/episodes/chunk-*/file-*.parquet"))
    if not files:
        raise VlampError(f"{name} is not a LeRobot v3.0 dataset: missing meta/episodes/chunk-*/file-*.parquet")
    out = {}
    for f in files:
        for row in _parquet(f, name).to_pylist():
            out[int(row["episode_index"])] = row
    return out
