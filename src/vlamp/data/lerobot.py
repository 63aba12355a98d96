"""The LeRobot dataset v3.0 layout: a writer for our demonstrations and a reader for any such dataset.

Layout (relative to the dataset root)::

    meta/info.json                           codebase_version "v3.0", fps, features, paths
    meta/stats.json                          per-feature mean / std / min / max / count
    meta/tasks.parquet                       task_index + task (pandas index "task", as LeRobot writes)
    meta/episodes/chunk-000/file-000.parquet one row per episode: length, tasks, frame range, files
    data/chunk-000/file-000.parquet          one row per frame; image features as PNG bytes
    videos/{key}/chunk-000/file-000.mp4      video features (read with PyAV)

The writer builds everything in a temporary directory next to the target and renames it into place
at the end, so a half-written dataset never looks complete.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlamp.precision.errors import VlampError

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_KEY, STATE_KEY, ACTION_KEY = "observation.image", "observation.state", "action"


@dataclasses.dataclass
class Episode:
    """One demonstration: ``images`` (T, H, W, 3) uint8, ``states`` (T, S) and ``actions`` (T, A)
    float32, and its instruction."""

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    task: str


def write_dataset(root: str | os.PathLike[str], episodes: Sequence[Episode], *, fps: int,
                  state_names: Sequence[str], action_names: Sequence[str],
                  robot_type: str = "sawyer", extra_meta: dict[str, Any] | None = None) -> Path:
    """Writes ``episodes`` as a LeRobot v3.0 dataset at ``root`` (which must not exist yet).
    ``extra_meta`` maps file names to JSON data written beside ``meta/info.json`` (vlamp's own
    records; LeRobot readers ignore them).

    Raises:
        VlampError: If ``root`` exists or its parent is not writable, or an episode's arrays do
            not fit the names (nothing is written then).
    """
    import pyarrow as pa

    _check_episodes(episodes, len(state_names), len(action_names))
    root = check_output_dir(root)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as e:
        raise VlampError(f"cannot write to {str(root.parent)!r}: {e.strerror}") from None
    try:
        tasks = list(dict.fromkeys(ep.task for ep in episodes))
        task_index = {t: i for i, t in enumerate(tasks)}
        h, w, c = episodes[0].images.shape[1:]
        images: list[dict[str, Any]] = []
        ep_rows: dict[str, list[Any]] = {k: [] for k in (
            "episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
            "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
            "meta/episodes/file_index")}
        index = 0
        for e, ep in enumerate(episodes):
            n = len(ep.actions)
            images.extend({"bytes": _png(img), "path": None} for img in ep.images)
            for key, value in (("episode_index", e), ("tasks", [ep.task]), ("length", n),
                               ("data/chunk_index", 0), ("data/file_index", 0),
                               ("dataset_from_index", index), ("dataset_to_index", index + n),
                               ("meta/episodes/chunk_index", 0), ("meta/episodes/file_index", 0)):
                ep_rows[key].append(value)
            index += n
        lengths = np.array([len(ep.actions) for ep in episodes])
        frame_index = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
        states = np.concatenate([ep.states for ep in episodes]).astype(np.float32)
        actions = np.concatenate([ep.actions for ep in episodes]).astype(np.float32)
        frames = pa.table({
            IMAGE_KEY: pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            STATE_KEY: _fixed_list(states),
            ACTION_KEY: _fixed_list(actions),
            "timestamp": pa.array((frame_index / fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)),
            "index": pa.array(np.arange(index, dtype=np.int64)),
            "task_index": pa.array(np.repeat([task_index[ep.task] for ep in episodes], lengths)
                                   .astype(np.int64)),
        })
        _write_parquet(frames, tmp / DATA_PATH.format(chunk_index=0, file_index=0))
        _write_parquet(pa.table(ep_rows), tmp / EPISODES_PATH.format(chunk_index=0, file_index=0))
        _write_parquet(_tasks_table(tasks), tmp / "meta/tasks.parquet")
        stats = {STATE_KEY: _stats(states.astype(np.float64)),
                 ACTION_KEY: _stats(actions.astype(np.float64)),
                 IMAGE_KEY: _image_stats(episodes, c)}
        info = _info(episodes, index, len(tasks), fps, robot_type, (h, w, c), state_names,
                     action_names)
        (tmp / "meta/info.json").write_text(json.dumps(info, indent=4))
        (tmp / "meta/stats.json").write_text(json.dumps(stats, indent=4))
        for name, data in (extra_meta or {}).items():
            (tmp / "meta" / name).write_text(json.dumps(data, indent=1))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _check_episodes(episodes: Sequence[Episode], states: int, actions: int) -> None:
    """Every episode's arrays: one row per frame, as wide as the names.

    Raises:
        VlampError: Naming the first episode that does not fit.
    """
    if not episodes:
        raise VlampError("write_dataset: no episodes to write")
    shape = episodes[0].images.shape[1:]
    for i, ep in enumerate(episodes):
        n = len(ep.actions)
        if ep.states.ndim != 2 or ep.states.shape[1] != states or ep.actions.ndim != 2 \
                or ep.actions.shape[1] != actions:
            raise VlampError(f"write_dataset: episode {i} ({ep.task!r}) has state/action widths "
                             f"{ep.states.shape[1:]}/{ep.actions.shape[1:]}, the names give "
                             f"{states}/{actions}")
        if len(ep.states) != n or len(ep.images) != n or ep.images.shape[1:] != shape:
            raise VlampError(f"write_dataset: episode {i} ({ep.task!r}) has {len(ep.images)} images "
                             f"of {ep.images.shape[1:]}, {len(ep.states)} states and {n} actions; "
                             f"each frame needs one of each, images of {shape}")


def _info(episodes: Sequence[Episode], frames: int, tasks: int, fps: int, robot_type: str,
          image_shape: tuple[int, int, int], state_names: Sequence[str],
          action_names: Sequence[str]) -> dict[str, Any]:
    """``meta/info.json``: the layout and features of the dataset."""
    h, w, c = image_shape
    return {
        "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
        "total_episodes": len(episodes), "total_frames": frames, "total_tasks": tasks,
        "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
        "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH, "video_path": None,
        "features": {
            IMAGE_KEY: {"dtype": "image", "shape": [h, w, c], "names": ["height", "width", "channels"]},
            STATE_KEY: {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
            ACTION_KEY: {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }


def check_output_dir(root: str | os.PathLike[str]) -> Path:
    """Checks that a dataset can be written at ``root``: it must not exist and its parent must be
    writable (created if missing). Called before minutes of simulation, and again by the writer.

    Raises:
        VlampError: If ``root`` exists or its parent cannot be written.
    """
    root = Path(root)
    if root.exists():
        raise VlampError(f"output directory {str(root)!r} already exists; choose another --out")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VlampError(f"cannot write to {str(root.parent)!r}: {e.strerror}") from None
    try:  # what the writer will do; os.access says yes to root where writing still fails (/proc)
        os.rmdir(tempfile.mkdtemp(prefix=f".{root.name}.probe.", dir=root.parent))
    except OSError as e:
        raise VlampError(f"cannot write to {str(root.parent)!r}: {e.strerror}") from None
    return root


def _fixed_list(matrix: np.ndarray):
    """(N, D) float32 -> Arrow fixed_size_list<float32>[D] without a round trip through Python."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _image_stats(episodes: Sequence[Episode], channels: int) -> dict[str, Any]:
    """Per-channel pixel stats in [0, 1], shaped (C, 1, 1) as LeRobot stores them; accumulated per
    episode so no float64 copy of every pixel is made."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    lo, hi, count = np.full(channels, 255.0), np.zeros(channels), 0
    for ep in episodes:
        px = ep.images.reshape(-1, channels).astype(np.float64)
        total += px.sum(0)
        total_sq += (px * px).sum(0)
        lo, hi, count = np.minimum(lo, px.min(0)), np.maximum(hi, px.max(0)), count + len(px)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))

    def shaped(v: np.ndarray) -> list:
        return (v / 255.0).reshape(channels, 1, 1).tolist()

    return {"min": shaped(lo), "max": shaped(hi), "mean": shaped(mean), "std": shaped(std),
            "count": [count]}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _stats(x: np.ndarray) -> dict[str, Any]:
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [len(x)]}


def _tasks_table(tasks: list[str]):
    """tasks.parquet as pandas writes a DataFrame indexed by task (what LeRobot's load_tasks reads)."""
    import pyarrow as pa

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
