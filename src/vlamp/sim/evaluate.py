"""Closed-loop evaluation: run a policy in the simulator for seeded episodes, count successes."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vlamp.precision.errors import VlampError
from vlamp.sim.env import DEFAULT_CAMERA, MetaWorldEnv, Observation, check_rendering
from vlamp.sim.tasks import DEFAULT_SUITE, Task, difficulty_groups, resolve_tasks

EVAL_SEED = 1_000_000  # evaluation episodes start here; generated training data never does
TARGET_HALF_WIDTH = 0.05  # the evaluation is sized so that its mean is known to +-5 points (95%)

# The defaults of every evaluation (vlamp eval, the trainer's, the demo's), chosen by the ablations
# in the README ("How sharp the evaluation is"). 35 episodes of each of the 6 default tasks put the
# mean's 95% interval within +-5 points from a success rate of 84% up (episodes_for computes it).
# The policy is queried at every step and the chunks' predictions for it averaged (ACT's temporal
# ensembling, k = 0.1).
EPISODES = 35  # per task
REPLAN_EVERY = 1  # steps between queries of the policy
ENSEMBLE = 0.1  # temporal ensembling weight (0: off)
MAX_STEPS = 200  # episode limit of the default suite, whose tasks all end well within it
METAWORLD_MAX_STEPS = 500  # Meta-World's own limit, the one MT10/MT50 results are reported at


class Policy(Protocol):
    """Maps an observation to an action chunk ``(H, 4)`` (or one action ``(4,)``). A policy may
    also define ``bind(env)``, called at the start of each episode (the scripted expert uses it)."""

    def __call__(self, obs: Observation) -> np.ndarray: ...


class ExpertPolicy:
    """Meta-World's scripted expert, through the same path as any learned policy."""

    def bind(self, env: MetaWorldEnv) -> None:
        self.env = env

    def __call__(self, obs: Observation) -> np.ndarray:
        return self.env.expert_action()


class RandomPolicy:
    """Uniform random actions in [-1, 1]: the floor every policy should beat."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: Observation) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=4).astype(np.float32)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate (well-behaved at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width(successes: int, n: int) -> float:
    """Half the width of the 95% Wilson interval: the "+-" of a success rate."""
    lo, hi = wilson_interval(successes, n)
    return (hi - lo) / 2


def episodes_for(rate: float, target: float = TARGET_HALF_WIDTH) -> int:
    """The fewest episodes whose 95% Wilson interval around a success rate of ``rate`` is at most
    ``target`` either side (on average: half the interval's width). 0.5 needs the most: 381 for
    +-5 points; 0.9 needs 141."""
    if not 0.0 <= rate <= 1.0 or target <= 0:
        raise VlampError(f"rate must be in [0, 1] and target > 0, got {rate} and {target}")
    lo, hi = 1, 1
    while half_width(round(rate * hi), hi) > target:
        lo, hi = hi + 1, hi * 2
    while lo < hi:  # the half-width falls with n (up to the rounding of rate * n)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if half_width(round(rate * mid), mid) <= target else (mid + 1, hi)
    return lo


@dataclasses.dataclass
class TaskResult:
    """One task's episodes; ``outcomes[i]`` is whether episode ``i`` (seed ``seed + i``) succeeded,
    so two policies run on the same seeds can be compared episode by episode."""

    task: str
    episodes: int
    successes: int
    mean_length: float
    outcomes: list[bool] = dataclasses.field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.successes, self.episodes)
        return {"task": self.task, "episodes": self.episodes, "successes": self.successes,
                "success_rate": self.success_rate, "ci95": [lo, hi], "mean_length": self.mean_length,
                "outcomes": [int(o) for o in self.outcomes]}


@dataclasses.dataclass
class EvalResult:
    """Per-task and pooled success (with 95% Wilson intervals), episode length and speed."""

    tasks: list[TaskResult]
    env_steps: int
    seconds: float
    max_steps: int = MAX_STEPS

    @property
    def success_rate(self) -> float:
        """Mean of the per-task success rates."""
        return float(np.mean([t.success_rate for t in self.tasks])) if self.tasks else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.seconds if self.seconds > 0 else 0.0

    @property
    def half_width(self) -> float:
        """The "+-" of the mean's 95% interval: Wilson's, over all episodes pooled. With the same
        number of episodes per task this is conservative: tasks that differ in success make the
        mean of per-task rates vary less than as many episodes of one task."""
        return half_width(sum(t.successes for t in self.tasks), sum(t.episodes for t in self.tasks))

    def episodes_needed(self, target: float = TARGET_HALF_WIDTH) -> int:
        """Episodes per task for a mean interval of at most ``target`` either side, at the success
        rate measured."""
        return -(-episodes_for(self.success_rate, target) // max(1, len(self.tasks)))

    def groups(self) -> dict[str, tuple[float, int]]:
        """Meta-World's difficulty groups among the tasks run (:data:`vlamp.sim.tasks.DIFFICULTY`,
        in its order): group -> (mean of its tasks' success rates, number of tasks)."""
        rate = {t.task: t.success_rate for t in self.tasks}
        return {g: (float(np.mean([rate[t] for t in members])), len(members))
                for g, members in difficulty_groups(list(rate)).items()}

    def as_dict(self) -> dict[str, Any]:
        succ = sum(t.successes for t in self.tasks)
        n = sum(t.episodes for t in self.tasks)
        return {
            "success_rate": self.success_rate,
            "ci95": list(wilson_interval(succ, n)),
            "ci95_half_width": self.half_width,
            "episodes": n,
            "mean_length": float(np.mean([t.mean_length for t in self.tasks])) if self.tasks else 0.0,
            "env_steps_per_s": self.steps_per_s,
            "max_steps": self.max_steps,
            "groups": {g: {"success_rate": r, "tasks": n} for g, (r, n) in self.groups().items()},
            "per_task": [t.as_dict() for t in self.tasks],
        }

    def table(self) -> str:
        w = max([14, *(len(t.task) for t in self.tasks)])
        lines = [f"{'task':<{w}} {'success':>8} {'95% CI':>14} {'mean len':>9}"]
        for t in self.tasks:
            lo, hi = wilson_interval(t.successes, t.episodes)
            lines.append(f"{t.task:<{w}} {t.successes:>3}/{t.episodes:<4} [{lo:5.0%}, {hi:5.0%}] "
                         f"{t.mean_length:>9.1f}")
        d = self.as_dict()
        lines.append(f"{'mean':<{w}} {self.success_rate:>8.0%} [{d['ci95'][0]:5.0%}, {d['ci95'][1]:5.0%}] "
                     f"{d['mean_length']:>9.1f}   ({self.steps_per_s:.0f} env steps/s)")
        lines.append(f"{'':<{w}} +-{self.half_width * 100:.1f} points (95%, {d['episodes']} episodes "
                     f"of at most {self.max_steps} steps)")
        if self.half_width > TARGET_HALF_WIDTH:
            lines[-1] += (f"; about {self.episodes_needed()} episodes per task would make it "
                          f"+-{TARGET_HALF_WIDTH * 100:.0f}")
        groups = self.groups()
        if len(groups) > 1:  # the grouping SmolVLA's MT50 table reports
            lines.append(group_line(groups))
        return "\n".join(lines)


def group_line(groups: dict[str, tuple[float, int]]) -> str:
    """One line of Meta-World's difficulty groups: group -> (mean success rate, tasks)."""
    return "by difficulty (mean of the tasks' rates): " + ", ".join(
        f"{g} {r:.1%} ({n} task{'s' if n > 1 else ''})" for g, (r, n) in groups.items())


def evaluate(
    policy: Policy | Callable[[Observation], np.ndarray],
    tasks: str | Sequence[str] | None = None,
    episodes: int = EPISODES,
    *,
    seed: int = EVAL_SEED,
    replan_every: int = REPLAN_EVERY,
    ensemble: float = ENSEMBLE,
    image_size: int = 64,
    camera: str = DEFAULT_CAMERA,
    max_steps: int | None = None,
    gif_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    workers: int = 1,
    threads: int = 1,
) -> EvalResult:
    """Runs ``policy`` closed-loop for ``episodes`` seeded episodes of each task.

    Args:
        policy: Observation -> action chunk ``(H, 4)`` or one action ``(4,)``. A policy with a
            ``reset(seed)`` method is reset before every episode with the episode's seed, so its
            own randomness (a flow head's noise) does not depend on what ran before.
        tasks: Task names and suite names (default: the default suite).
        episodes: Episodes per task; episode ``i`` of every task uses seed ``seed + i``.
        seed: First episode seed.
        replan_every: Receding horizon: execute at most this many actions of a chunk, then query
            the policy again.
        ensemble: Temporal ensembling (ACT's): with a weight ``k > 0`` every step's action is the
            average of what each chunk predicted for that step, the oldest prediction weighted
            ``exp(0)``, the next ``exp(-k)``, ...; the policy is still queried every
            ``replan_every`` steps. 0 executes each chunk's actions as predicted.
        image_size: Camera image side; must match what the policy was trained on.
        camera: What the images are rendered from; must match too.
        max_steps: Episode limit; an episode that has not succeeded by then fails. Default:
            :func:`episode_limit` of the tasks.
        gif_path: If given, the first episode of each task is saved there as an animated GIF.
        progress: Show a progress bar.
        workers: Processes the tasks are spread over. With more than one, ``policy`` must be a
            picklable *recipe*: a callable of no arguments that builds the policy in each process
            (:func:`vlamp.train.policy.policy_recipe`, ``ExpertPolicy``), built there with one
            torch thread. Same episodes and seeds as with one process, and with ``threads=1``
            the same results. No GIF.
        threads: Torch threads of a policy run here (workers: one each; why: ``_torch_threads``).

    Returns:
        An :class:`EvalResult`.
    """
    chosen: list[Task] = resolve_tasks(tasks)
    if workers < 1:
        raise VlampError(f"workers must be >= 1, got {workers}")
    check_execution(replan_every, ensemble)  # before any process or simulator starts
    check_rendering()
    if (max_steps := episode_limit(chosen) if max_steps is None else max_steps) < 1:
        raise VlampError(f"max_steps must be >= 1, got {max_steps}")
    settings = (episodes, seed, replan_every, ensemble, image_size, camera, max_steps)
    bar = tqdm(total=len(chosen) * episodes, desc="eval", unit="ep", disable=not progress, leave=False)
    start = time.perf_counter()
    if workers > 1 and len(chosen) > 1 and gif_path is None:
        import multiprocessing as mp

        jobs = [(policy, task, settings) for task in chosen]
        with mp.get_context("spawn").Pool(min(workers, len(chosen))) as pool:
            done = {}
            for result, steps in pool.imap_unordered(_task_job, jobs):
                done[result.task] = (result, steps)
                bar.update(episodes)
                bar.set_postfix(task=result.task, success=f"{result.successes}/{episodes}")
        results = [done[t.name][0] for t in chosen]
        total_steps, frames = sum(s for _, s in done.values()), []
    else:
        if workers > 1:  # a recipe was given, but one task (or a GIF) runs here: build it here
            policy = policy()
        frames = []
        with _torch_threads(threads):
            done = [_run_task(policy, t, settings, bar, frames if gif_path else None) for t in chosen]
        results, total_steps = [r for r, _ in done], sum(n for _, n in done)
    bar.close()
    if gif_path is not None and frames:
        _save_gif(gif_path, frames)
    return EvalResult(results, total_steps, time.perf_counter() - start, max_steps)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Torch computes on ``n`` threads inside; the count before is restored on the way out.
    Evaluation's default is one: a batch-1 forward of the default TinyVLA gains nothing from two
    (51 against 49 environment steps/s on a quiet 2-core EPYC), and while another process kept a
    core busy, two made it 15x slower (300 s instead of 22 s for two 500-step episodes)."""
    import torch

    if n < 1:
        raise VlampError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def episode_limit(tasks: Sequence[Task]) -> int:
    """The default episode limit: :data:`MAX_STEPS` (200) when every task is one of the default
    suite's, which all end well within it; otherwise Meta-World's own 500
    (:data:`METAWORLD_MAX_STEPS`), the limit MT10 and MT50 results are published at."""
    return MAX_STEPS if all(t.name in DEFAULT_SUITE for t in tasks) else METAWORLD_MAX_STEPS


def _run_task(policy, task: Task, settings: tuple, bar=None, frames: list | None = None
              ) -> tuple[TaskResult, int]:
    """One task's episodes; ``frames`` (if given) collects the first episode's images."""
    episodes, seed, replan_every, ensemble, image_size, camera, max_steps = settings
    successes, lengths, outcomes, steps = 0, [], [], 0
    with MetaWorldEnv(task, image_size=image_size, max_steps=max_steps, camera=camera) as env:
        for i in range(episodes):
            obs, done, success = env.reset(seed + i), False, False
            if hasattr(policy, "bind"):
                policy.bind(env)
            if hasattr(policy, "reset"):
                policy.reset(seed + i)
            record = frames is not None and i == 0
            chunks = ChunkExecutor(replan_every, ensemble)
            while not done:
                if chunks.needs_query():
                    chunks.add(np.asarray(policy(obs), dtype=np.float32).reshape(-1, 4))
                if record:
                    frames.append(obs.image)
                obs, success, done = env.step(chunks.next_action())
            steps += env.steps
            successes += int(success)
            outcomes.append(bool(success))
            lengths.append(env.steps)
            if bar is not None:
                bar.update()
                bar.set_postfix(task=task.name, success=f"{successes}/{i + 1}")
    return TaskResult(task.name, episodes, successes, float(np.mean(lengths)), outcomes), steps


def check_execution(replan_every: int, ensemble: float) -> None:
    """Raises :class:`VlampError` unless ``replan_every >= 1`` and ``ensemble >= 0``."""
    if replan_every < 1 or ensemble < 0:
        raise VlampError(f"replan_every must be >= 1 and ensemble >= 0, got {replan_every} and "
                         f"{ensemble}")


class ChunkExecutor:
    """Turns predicted action chunks into one action per step.

    Receding horizon (``ensemble=0``): the newest chunk's actions in order, a new chunk every
    ``replan_every`` steps. Temporal ensembling (ACT, Zhao et al. 2023): every chunk still covering
    the current step votes for it, the oldest with weight 1, each younger one ``exp(-ensemble)``
    times the one before.
    """

    def __init__(self, replan_every: int, ensemble: float = 0.0) -> None:
        check_execution(replan_every, ensemble)
        self.replan_every, self.ensemble = replan_every, ensemble
        self.t = 0
        self._chunks: list[tuple[int, np.ndarray]] = []  # (step it was predicted at, chunk)

    def needs_query(self) -> bool:
        if not self._chunks:
            return True
        start, chunk = self._chunks[-1]
        return self.t - start >= min(self.replan_every, len(chunk))

    def add(self, chunk: np.ndarray) -> None:
        self._chunks.append((self.t, chunk))
        if not self.ensemble:
            self._chunks = self._chunks[-1:]

    def next_action(self) -> np.ndarray:
        live = [(s, c) for s, c in self._chunks if self.t - s < len(c)]
        self._chunks = live
        if self.ensemble:
            votes = np.stack([c[self.t - s] for s, c in live])
            w = np.exp(-self.ensemble * np.arange(len(live)))
            action = (w[:, None] * votes).sum(0) / w.sum()
        else:
            s, c = live[-1]
            action = c[self.t - s]
        self.t += 1
        return action


_POLICY: dict[str, Any] = {}  # per worker process: the policy built from the recipe


def _task_job(job: tuple) -> tuple[TaskResult, int]:
    """A worker's job: one task, with the policy built once per process from its recipe."""
    import torch

    recipe, task, settings = job
    torch.set_num_threads(1)  # one process per core: the simulator and the policy share it
    if "policy" not in _POLICY:
        _POLICY["policy"] = recipe()
    return _run_task(_POLICY["policy"], task, settings)


def _save_gif(path: str | os.PathLike[str], frames: list[np.ndarray]) -> None:
    import imageio.v3 as iio

    big = [np.repeat(np.repeat(f, 3, axis=0), 3, axis=1) for f in frames[::2]]
    tmp = f"{os.fspath(path)}.tmp.gif"
    iio.imwrite(tmp, np.stack(big), duration=50, loop=0)
    os.replace(tmp, path)
