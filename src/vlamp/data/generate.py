"""Scripted-expert demonstrations in Meta-World, written as a LeRobot v3.0 dataset.

Episode ``k`` of a task is the first successful expert rollout among seeds
``seed * 100_000 + 1_000 * k + j`` (j = 0, 1, ...), so a dataset is a pure function of its
arguments, whatever the number of worker processes. Only successful episodes are kept.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlamp.data.lerobot import Episode, check_output_dir, write_dataset
from vlamp.precision.errors import VlampError
from vlamp.sim.tasks import Task, resolve_tasks

FPS = 80  # Meta-World: 2.5 ms physics step x frame_skip 5
MAX_TRIES = 20

_ENVS: dict[tuple[str, int, int], object] = {}  # per worker process: one env per task


def _rollout(job: tuple[Task, int, int, int, int]) -> tuple[str, int, Episode | None, int]:
    from vlamp.sim.env import MetaWorldEnv

    task, k, seed, image_size, max_steps = job
    key = (task.name, image_size, max_steps)
    if key not in _ENVS:
        _ENVS[key] = MetaWorldEnv(task, image_size=image_size, max_steps=max_steps)
    env = _ENVS[key]
    for j in range(MAX_TRIES):
        obs = env.reset(seed * 100_000 + 1_000 * k + j)
        images, states, actions, success, done = [], [], [], False, False
        while not done:
            action = env.expert_action()
            images.append(obs.image)
            states.append(obs.state)
            actions.append(action)
            obs, success, done = env.step(action)
        if success:
            return task.name, k, Episode(np.stack(images), np.stack(states), np.stack(actions),
                                         task.instruction), j + 1
    return task.name, k, None, MAX_TRIES


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlamp" / "datasets"


def dataset_id(tasks: Sequence[Task], episodes_per_task: int, image_size: int, seed: int,
               max_steps: int) -> str:
    spec = json.dumps([[t.name for t in tasks], episodes_per_task, image_size, seed, max_steps, "v1"])
    return f"metaworld-{len(tasks)}t-{episodes_per_task}e-{image_size}px-s{seed}-" \
           f"{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def generate(
    tasks: str | Sequence[str] | None = None,
    episodes_per_task: int = 25,
    *,
    image_size: int = 64,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    max_steps: int = 200,
    progress: bool = True,
) -> Path:
    """Generates (or finds in the cache) a dataset of expert demonstrations.

    Args:
        tasks: Task names (default: the default suite).
        episodes_per_task: Successful episodes kept per task.
        image_size: Camera image side.
        seed: Base seed; the same arguments always give the same dataset.
        out: Where to write it (must not exist). Default: the user cache directory, where an
            existing dataset with the same arguments is reused.
        workers: Worker processes (default: all cores).
        max_steps: Episode limit of each rollout.
        progress: Show a progress bar.

    Returns:
        The dataset directory.

    Raises:
        VlampError: On unknown tasks, a bad count, an existing or unwritable ``out``.
    """
    chosen = resolve_tasks(tasks)
    if episodes_per_task < 1:
        raise VlampError(f"episodes per task must be >= 1, got {episodes_per_task}")
    if image_size < 8:
        raise VlampError(f"image size must be >= 8, got {image_size}")
    if out is None:
        root = default_cache_dir() / dataset_id(chosen, episodes_per_task, image_size, seed, max_steps)
        if (root / "meta/info.json").is_file():
            return root
    else:
        root = Path(out)
    check_output_dir(root)  # fail before minutes of simulation rather than after
    jobs = [(t, k, seed, image_size, max_steps) for t in chosen for k in range(episodes_per_task)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: dict[tuple[str, int], Episode] = {}
    failed = []
    bar = tqdm(total=len(jobs), desc="generate", unit="ep", disable=not progress)
    ctx = mp.get_context("spawn")  # a fresh process per worker: EGL contexts do not survive fork
    with ctx.Pool(workers) if workers > 1 else _InProcess() as pool:
        for name, k, episode, _tries in pool.imap_unordered(_rollout, jobs):
            if episode is None:
                failed.append((name, k))
            else:
                results[(name, k)] = episode
            bar.update()
    bar.close()
    if failed:
        raise VlampError(f"the expert failed {MAX_TRIES} times in a row on {failed[:3]}; "
                         "try a larger --max-steps")
    episodes = [results[(t.name, k)] for t in chosen for k in range(episodes_per_task)]
    from vlamp.sim.env import ACTION_NAMES, STATE_NAMES

    try:
        return write_dataset(root, episodes, fps=FPS, state_names=STATE_NAMES, action_names=ACTION_NAMES)
    except VlampError:
        if out is None and (root / "meta/info.json").is_file():
            return root  # another process filled the cache meanwhile
        raise


class _InProcess:
    """The ``Pool`` interface run in this process (one worker: no spawn cost)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)
