"""Reads a LeRobot v3.0 dataset (ours or a user's) into arrays, checking it on the way in.

Cameras may be image features (PNG bytes in the data parquet) or video features (mp4 files decoded
with PyAV). Every problem a user can cause — a directory that is not such a dataset, a missing
file, a corrupted parquet, NaN in a column — is a :class:`VlampError` that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlamp.data.lerobot import ACTION_KEY, CODEBASE_VERSION, STATE_KEY
from vlamp.precision.errors import VlampError


@dataclasses.dataclass
class LeRobotData:
    """A dataset in memory: one row per frame, images decoded to (N, H, W, 3) uint8."""

    root: Path
    info: dict[str, Any]
    stats: dict[str, Any]
    tasks: list[str]
    camera_key: str
    images: np.ndarray
    state: np.ndarray
    action: np.ndarray
    episode_index: np.ndarray
    frame_index: np.ndarray
    task_index: np.ndarray

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def num_episodes(self) -> int:
        return len(np.unique(self.episode_index))

    def __len__(self) -> int:
        return len(self.action)


def read_dataset(root: str | Path, camera_key: str | None = None) -> LeRobotData:
    """Loads the dataset at ``root``.

    Args:
        root: The dataset directory (the one holding ``meta/`` and ``data/``).
        camera_key: Which image/video feature to use (default: the first one in info.json).

    Raises:
        VlampError: If the directory is not a LeRobot v3.0 dataset or its files are damaged.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    name = f"{str(root)!r}"
    if not root.is_dir():
        raise VlampError(f"dataset {name}: no such directory")
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
    stats = _json(root / "meta/stats.json", name)
    tasks_table = _parquet(root / "meta/tasks.parquet", name)
    task_col = "task" if "task" in tasks_table.column_names else "__index_level_0__"
    if task_col not in tasks_table.column_names or "task_index" not in tasks_table.column_names:
        raise VlampError(f"dataset {name}: meta/tasks.parquet needs task and task_index columns")
    order = np.argsort(tasks_table.column("task_index").to_numpy())
    tasks = [tasks_table.column(task_col).to_pylist()[i] for i in order]

    video = features[camera_key]["dtype"] == "video"
    columns = [STATE_KEY, ACTION_KEY, "episode_index", "frame_index", "task_index", "index"]
    if not video:
        columns.append(camera_key)
    import pyarrow as pa

    try:
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in data_files])
    except (pa.ArrowInvalid, OSError) as e:
        raise VlampError(f"dataset {name}: cannot read data parquet ({e})") from None
    except KeyError as e:
        raise VlampError(f"dataset {name}: data parquet lacks column {e}") from None
    table = table.sort_by("index")
    state = _matrix(table, STATE_KEY, name)
    action = _matrix(table, ACTION_KEY, name)
    ints = {k: table.column(k).to_numpy().astype(np.int64) for k in ("episode_index", "frame_index", "task_index")}
    if video:
        images = _decode_videos(root, info, camera_key, ints["episode_index"], ints["frame_index"], name)
    else:
        images = _decode_pngs(table.column(camera_key).combine_chunks().field("bytes").to_pylist(), name)
    return LeRobotData(root, info, stats, tasks, camera_key, images, state, action,
                       ints["episode_index"], ints["frame_index"], ints["task_index"])


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


def _decode_pngs(blobs: list[bytes], name: str) -> np.ndarray:
    from PIL import Image

    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
        except Exception as e:  # PIL raises several types for damaged images
            raise VlampError(f"dataset {name}: image of frame {i} cannot be decoded ({e})") from None
    return np.stack(out)


def _decode_videos(root: Path, info: dict[str, Any], key: str, episode_index: np.ndarray,
                   frame_index: np.ndarray, name: str) -> np.ndarray:
    import av

    episodes = _episodes(root, name)
    fps = float(info["fps"])
    template = info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    cache: dict[tuple[int, int], list[np.ndarray]] = {}
    out = []
    for ep, fr in zip(episode_index, frame_index):
        meta = episodes[int(ep)]
        file_key = (int(meta[f"videos/{key}/chunk_index"]), int(meta[f"videos/{key}/file_index"]))
        if file_key not in cache:
            path = root / template.format(video_key=key, chunk_index=file_key[0], file_index=file_key[1])
            try:
                with av.open(str(path)) as container:
                    cache[file_key] = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            except (av.error.FFmpegError, OSError) as e:
                raise VlampError(f"dataset {name}: cannot decode video {path.name} of {key!r} ({e})") from None
        frames = cache[file_key]
        pos = int(round((float(meta[f"videos/{key}/from_timestamp"]) + fr / fps) * fps))
        if pos >= len(frames):
            raise VlampError(f"dataset {name}: video of {key!r} has {len(frames)} frames, "
                             f"episode {int(ep)} needs frame {pos}")
        out.append(frames[pos])
    return np.stack(out)


def _episodes(root: Path, name: str) -> dict[int, dict[str, Any]]:
    files = sorted(root.glob("meta/episodes/chunk-*/file-*.parquet"))
    if not files:
        raise VlampError(f"{name} is not a LeRobot v3.0 dataset: missing meta/episodes/chunk-*/file-*.parquet")
    out = {}
    for f in files:
        for row in _parquet(f, name).to_pylist():
            out[int(row["episode_index"])] = row
    return out
