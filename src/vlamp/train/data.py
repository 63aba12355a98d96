"""The run's dataset: loaded (the default suite generated on first use) and split into training
and validation episodes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vlamp.data.generate import generate
from vlamp.data.reader import LeRobotData, read_dataset
from vlamp.precision.errors import VlampError
from vlamp.train.config import RunConfig


def dataset_path(config: RunConfig, progress: bool = True) -> str:
    """``dataset.path``, or without one the cache directory of ``dataset.tasks``' demonstrations,
    generated there on first use (and found there after)."""
    d = config.dataset
    if d.path:
        return d.path
    return str(generate(d.tasks or None, d.episodes_per_task, image_size=d.image_size,
                        progress=progress))


def with_dataset_path(config: RunConfig, progress: bool = True) -> RunConfig:
    """``config`` reading :func:`dataset_path`'s directory (generated now if it must be), for
    processes that each load the same data: they find it instead of generating it at once."""
    if config.dataset.path:
        return config
    path = dataset_path(config, progress)
    return dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, path=path,
                                                                   tasks=""))


def load_data(config: RunConfig, progress: bool = True) -> LeRobotData:
    """The configured dataset (:func:`dataset_path`), read."""
    path = dataset_path(config, progress)
    if not Path(path).is_dir():
        raise VlampError(f"dataset.path {path!r} is not a directory (a LeRobot v3.0 dataset; "
                         f"see `vlamp data generate`)")
    return read_dataset(path, stream=config.dataset.stream, progress=progress)


def split_episodes(data: LeRobotData, val_per_task: int) -> tuple[list[int], list[int]]:
    """Train/validation episode split: the last ``val_per_task`` episodes of each task validate
    (never all of a task's episodes)."""
    starts = np.r_[0, np.flatnonzero(np.diff(data.episode_index)) + 1]
    by_task: dict[int, list[int]] = {}
    for s in starts:
        by_task.setdefault(int(data.task_index[s]), []).append(int(data.episode_index[s]))
    train, val = [], []
    for eps in by_task.values():
        k = min(val_per_task, len(eps) - 1)
        train += eps[: len(eps) - k]
        val += eps[len(eps) - k:] if k > 0 else []
    return sorted(train), sorted(val)
