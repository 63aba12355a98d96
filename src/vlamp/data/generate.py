"""Scripted-expert demonstrations in Meta-World, written as a LeRobot v3.0 dataset.

Episode ``k`` of a task is the first successful expert rollout among seeds
``seed * 100_000 + 1_000 * k + j`` (j = 0, 1, ..., at most ``MAX_TRIES``), so a dataset is a pure
function of its arguments, whatever the number of worker processes. Only successful episodes are
kept. The tasks take turns (episodes 0-4 of every task, then 5-9, ...: ``CHUNK`` episodes of one
task are one job, so a worker builds one simulator per job and holds one at a time — MT50's 50
simulators held at once took 7-8 GB per worker), so a task whose expert fails shows it within its
first job, and a task whose expert fails ``GIVE_UP`` episodes in a row is given up; the other
tasks' episodes are written all the same, and the shortfall is said and recorded in
``meta/vlamp_generation.json`` with each task's expert success rate.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlamp.data.lerobot import Episode, check_output_dir, write_dataset
from vlamp.io import cache_dir
from vlamp.precision.errors import VlampError
from vlamp.sim.env import DEFAULT_CAMERA, UNRECORDED_CAMERA, check_camera, check_rendering
from vlamp.sim.evaluate import EVAL_SEED
from vlamp.sim.tasks import Task, resolve_tasks

FPS = 80  # Meta-World: 2.5 ms physics step x frame_skip 5
MAX_TRIES = 20  # rollouts (fresh seeds) tried for one episode before it counts as failed
GIVE_UP = 3  # episodes of one task failed in a row before the task's others are not tried
CHUNK = 5  # episodes of one task per job (building a simulator takes ~1 s, an episode 1-3 s)
REPORT = "vlamp_generation.json"

_ENV: list = []  # per worker process: ``[key, env]`` of the one simulator it holds, or empty


_GIVEN_UP = None  # per worker process: a shared flag per task, set once the task is given up


def _init_worker(given_up) -> None:
    global _GIVEN_UP
    _GIVEN_UP = given_up


def _rollouts(job: tuple[int, Task, tuple[int, ...], int, int, int, int, str]
              ) -> list[tuple[str, int, Episode | None, int]]:
    """Episodes ``ks`` of a task, each as ``(task, k, episode, tries)``: its first successful
    rollout, ``None`` after ``max_tries`` failures, or ``None`` with 0 tries when the task was given
    up meanwhile (or failed ``GIVE_UP`` episodes in a row in this job)."""
    index, task, ks, seed, image_size, max_steps, max_tries, camera = job
    out, streak = [], 0
    for k in ks:
        if (_GIVEN_UP is not None and _GIVEN_UP[index]) or streak >= GIVE_UP:
            out.append((task.name, k, None, 0))
            continue
        env = _simulator((task.name, image_size, max_steps, camera), task)
        out.append(_rollout(env, task, k, seed, max_tries))
        streak = streak + 1 if out[-1][2] is None else 0
    return out


def _simulator(key: tuple, task: Task):
    """The worker's simulator for ``key``, built (and the one it held closed) if it holds another."""
    from vlamp.sim.env import MetaWorldEnv

    if not _ENV or _ENV[0] != key:
        _close_simulator()
        _, image_size, max_steps, camera = key
        _ENV[:] = [key, MetaWorldEnv(task, image_size=image_size, max_steps=max_steps, camera=camera)]
    return _ENV[1]


def _close_simulator() -> None:
    if _ENV:
        _ENV[1].close()
        _ENV.clear()


def _rollout(env, task: Task, k: int, seed: int, max_tries: int
             ) -> tuple[str, int, Episode | None, int]:
    """Episode ``k`` of a task: its first successful rollout, or ``None`` after ``max_tries``."""
    for j in range(max_tries):
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
    return task.name, k, None, max_tries


def default_cache_dir() -> Path:
    return cache_dir("datasets")


# v2: goal-conditioned tasks show their goal, and every expert sees the goal (before, the env's cached
# observation bounds zeroed it after the first step); the default suite's episodes came out the same.
# v3: the camera is part of the dataset (v2 datasets were all rendered from ``corner``).
def dataset_id(tasks: Sequence[Task], episodes_per_task: int, image_size: int, seed: int,
               max_steps: int, max_tries: int = MAX_TRIES, camera: str = DEFAULT_CAMERA) -> str:
    spec = json.dumps([[t.name for t in tasks], episodes_per_task, image_size, seed, max_steps,
                       max_tries, camera, "v3"])
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
    max_tries: int = MAX_TRIES,
    camera: str = DEFAULT_CAMERA,
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
        max_tries: Rollouts (fresh seeds) tried for one episode before it counts as failed; a task
            is given up after ``GIVE_UP`` failed episodes in a row.
        camera: What the images are rendered from (:data:`vlamp.sim.env.CAMERAS` or one of
            Meta-World's named cameras); recorded in the dataset, and evaluation renders from it.
        progress: Show a progress bar.

    Returns:
        The dataset directory.

    Raises:
        VlampError: On unknown tasks, a bad count, an existing or unwritable ``out``.
    """
    chosen = resolve_tasks(tasks)
    _check_arguments(episodes_per_task, image_size, max_tries, camera, seed)
    if out is None:
        root = default_cache_dir() / dataset_id(chosen, episodes_per_task, image_size, seed, max_steps,
                                                max_tries, camera)
        if (root / "meta/info.json").is_file():
            return root
    else:
        root = Path(out)
    check_output_dir(root)  # fail before minutes of simulation rather than after
    check_rendering()
    # Tasks take turns, so every task's first episodes come early.
    jobs = [(i, t, tuple(range(k, min(k + CHUNK, episodes_per_task))), seed, image_size, max_steps,
             max_tries, camera) for k in range(0, episodes_per_task, CHUNK) for i, t in enumerate(chosen)]
    say = tqdm.write if progress else (lambda line: print(line, file=sys.stderr))
    results, stats = _roll_out(jobs, chosen, episodes_per_task, workers, max_tries, max_steps, say,
                               progress)
    for name, st in stats.items():
        st["expert_success_rate"] = st["kept"] / st["rollouts"] if st["rollouts"] else None
    short = {n: st for n, st in stats.items() if st["kept"] < st["asked"]}
    for name, st in short.items():
        say(f"warning: {name}: {st['kept']} of {st['asked']} episodes (the expert succeeded in "
            f"{st['kept']} of {st['rollouts']} rollouts)")
    episodes = [results[(t.name, k)] for t in chosen for k in range(episodes_per_task)
                if (t.name, k) in results]
    if not episodes:
        raise VlampError(f"the expert succeeded in no episode of {', '.join(stats)}; "
                         f"try a larger --max-steps (now {max_steps})")
    from vlamp.sim.env import ACTION_NAMES, STATE_NAMES

    report = {"camera": camera, "max_tries": max_tries, "give_up": GIVE_UP, "max_steps": max_steps,
              "tasks": stats}
    try:
        return write_dataset(root, episodes, fps=FPS, state_names=STATE_NAMES,
                             action_names=ACTION_NAMES, extra_meta={REPORT: report})
    except VlampError:
        if out is None and (root / "meta/info.json").is_file():
            return root  # another process filled the cache meanwhile
        raise


def _check_arguments(episodes_per_task: int, image_size: int, max_tries: int, camera: str,
                     seed: int) -> None:
    """Everything :func:`generate` is given, before a simulator starts."""
    if episodes_per_task < 1:
        raise VlampError(f"episodes per task must be >= 1, got {episodes_per_task}")
    if image_size < 8:
        raise VlampError(f"image size must be >= 8, got {image_size}")
    if max_tries < 1:
        raise VlampError(f"max tries must be >= 1, got {max_tries}")
    check_camera(camera)
    last = seed * 100_000 + 1_000 * (episodes_per_task - 1) + max_tries - 1
    if seed < 0 or last >= EVAL_SEED:
        raise VlampError(f"seed {seed} with {episodes_per_task} episodes per task would use simulator "
                         f"seeds up to {last:,}; evaluation episodes use {EVAL_SEED:,} and up, and a "
                         f"policy must not be evaluated on episodes it was trained on: choose a seed "
                         f"from 0 to {(EVAL_SEED - 1_000 * episodes_per_task) // 100_000}")


def _roll_out(jobs: list[tuple], chosen: list[Task], episodes_per_task: int, workers: int | None,
              max_tries: int, max_steps: int, say, progress: bool
              ) -> tuple[dict[tuple[str, int], Episode], dict[str, dict[str, Any]]]:
    """Runs the expert's rollouts over ``workers`` processes: the kept episodes by (task, index),
    and per task how many were asked, kept and rolled out; a task that fails ``GIVE_UP`` episodes
    in a row is given up (the others go on)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    total = len(chosen) * episodes_per_task
    results: dict[tuple[str, int], Episode] = {}
    stats = {t.name: {"asked": episodes_per_task, "kept": 0, "rollouts": 0, "failed_episodes": 0,
                      "given_up": False} for t in chosen}
    streak = dict.fromkeys(stats, 0)
    index = {t.name: i for i, t in enumerate(chosen)}
    ctx = mp.get_context("spawn")  # a fresh process per worker: EGL contexts do not survive fork
    given_up = ctx.Array("b", len(chosen), lock=False)
    bar = tqdm(total=total, desc="generate", unit="ep", disable=not progress)
    pool = ctx.Pool(workers, _init_worker, (given_up,)) if workers > 1 else _InProcess(given_up)
    with pool:
        for name, k, episode, tries in (r for rs in pool.imap_unordered(_rollouts, jobs) for r in rs):
            bar.update()
            st = stats[name]
            st["rollouts"] += tries
            if episode is not None:
                results[(name, k)] = episode
                st["kept"] += 1
                streak[name] = 0
                continue
            if tries == 0:
                continue  # given up before this episode started
            st["failed_episodes"] += 1
            streak[name] += 1
            say(f"warning: {name}: the expert failed {max_tries} rollouts in a row for episode {k} "
                f"(episodes end after {max_steps} steps)")
            if streak[name] >= GIVE_UP and not st["given_up"]:
                st["given_up"] = True
                given_up[index[name]] = 1
                say(f"warning: {name}: given up after {GIVE_UP} failed episodes in a row; the other "
                    f"tasks go on (a larger --max-steps may help)")
    bar.close()
    return results, stats


def generation_report(root: str | os.PathLike[str]) -> dict | None:
    """What :func:`generate` recorded about a dataset (per task: episodes asked and kept,
    rollouts, the expert's success rate, whether the task was given up) and the camera; ``None``
    for datasets it did not write."""
    path = Path(root) / "meta" / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def dataset_camera(root: str | os.PathLike[str]) -> str:
    """The camera a dataset's images were rendered from, for evaluation in the simulator: what
    :func:`generate` recorded; ``corner`` for datasets it wrote before it recorded one (all rendered
    from there); the default camera for datasets from elsewhere."""
    report = generation_report(root)
    if report is None:
        return DEFAULT_CAMERA
    return report.get("camera", UNRECORDED_CAMERA)


class _InProcess:
    """The ``Pool`` interface run in this process (one worker: no spawn cost)."""

    def __init__(self, given_up) -> None:
        _init_worker(given_up)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        _close_simulator()
        _init_worker(None)

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)
