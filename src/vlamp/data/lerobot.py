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
                  robot_type: str = "sawyer") -> Path:
    """Writes ``episodes`` as a LeRobot v3.0 dataset at ``root`` (which must not exist yet).

    Raises:
        VlampError: If ``root`` exists or its parent is not writable.
    """
    import pyarrow as pa

    root = Path(root)
    if root.exists():
        raise VlampError(f"output directory {str(root)!r} already exists; choose another --out")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as e:
        raise VlampError(f"cannot write to {str(root.parent)!r}: {e.strerror}") from None
    try:
        tasks = list(dict.fromkeys(ep.task for ep in episodes))
        task_index = {t: i for i, t in enumerate(tasks)}
        h, w, c = episodes[0].images.shape[1:]
        cols: dict[str, list[Any]] = {k: [] for k in (
            IMAGE_KEY, STATE_KEY, ACTION_KEY, "timestamp", "frame_index", "episode_index", "index",
            "task_index")}
        ep_rows: dict[str, list[Any]] = {k: [] for k in (
            "episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
            "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
            "meta/episodes/file_index")}
        index = 0
        for e, ep in enumerate(episodes):
            n = len(ep.actions)
            for t in range(n):
                cols[IMAGE_KEY].append({"bytes": _png(ep.images[t]), "path": None})
            cols[STATE_KEY].extend(ep.states.astype(np.float32).tolist())
            cols[ACTION_KEY].extend(ep.actions.astype(np.float32).tolist())
            cols["timestamp"].extend((np.arange(n) / fps).astype(np.float32).tolist())
            cols["frame_index"].extend(range(n))
            cols["episode_index"].extend([e] * n)
            cols["index"].extend(range(index, index + n))
            cols["task_index"].extend([task_index[ep.task]] * n)
            for key, value in (("episode_index", e), ("tasks", [ep.task]), ("length", n),
                               ("data/chunk_index", 0), ("data/file_index", 0),
                               ("dataset_from_index", index), ("dataset_to_index", index + n),
                               ("meta/episodes/chunk_index", 0), ("meta/episodes/file_index", 0)):
                ep_rows[key].append(value)
            index += n
        s_dim, a_dim = len(state_names), len(action_names)
        schema = pa.schema([
            (IMAGE_KEY, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            (STATE_KEY, pa.list_(pa.float32(), s_dim)),
            (ACTION_KEY, pa.list_(pa.float32(), a_dim)),
            ("timestamp", pa.float32()),
            ("frame_index", pa.int64()), ("episode_index", pa.int64()), ("index", pa.int64()),
            ("task_index", pa.int64()),
        ])
        _write_parquet(pa.table(cols, schema=schema), tmp / DATA_PATH.format(chunk_index=0, file_index=0))
        _write_parquet(pa.table(ep_rows), tmp / EPISODES_PATH.format(chunk_index=0, file_index=0))
        _write_parquet(_tasks_table(tasks), tmp / "meta/tasks.parquet")
        states = np.concatenate([ep.states for ep in episodes]).astype(np.float64)
        actions = np.concatenate([ep.actions for ep in episodes]).astype(np.float64)
        pixels = np.concatenate([ep.images for ep in episodes]).reshape(-1, c).astype(np.float64) / 255
        stats = {STATE_KEY: _stats(states), ACTION_KEY: _stats(actions),
                 IMAGE_KEY: {k: np.reshape(v, (c, 1, 1)).tolist() if k != "count" else v
                             for k, v in _stats(pixels).items()}}
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": len(episodes), "total_frames": index, "total_tasks": len(tasks),
            "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
            "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": DATA_PATH, "video_path": None,
            "features": {
                IMAGE_KEY: {"dtype": "image", "shape": [h, w, c], "names": ["height", "width", "channels"]},
                STATE_KEY: {"dtype": "float32", "shape": [s_dim], "names": list(state_names)},
                ACTION_KEY: {"dtype": "float32", "shape": [a_dim], "names": list(action_names)},
                "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                "frame_index": {"dtype": "int64", "shape": [1], "names": None},
                "episode_index": {"dtype": "int64", "shape": [1], "names": None},
                "index": {"dtype": "int64", "shape": [1], "names": None},
                "task_index": {"dtype": "int64", "shape": [1], "names": None},
            },
        }
        (tmp / "meta/info.json").write_text(json.dumps(info, indent=4))
        (tmp / "meta/stats.json").write_text(json.dumps(stats, indent=4))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _stats(x: np.ndarray) -> dict[str, Any]:
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(len(x))]}


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
