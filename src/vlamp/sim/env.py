"""One Meta-World task as vlamp sees it: an RGB camera image, proprio state and an instruction.

Rendering is MuJoCo's own offscreen renderer with shadows, reflections, skybox and anti-aliasing off
and the marker sites hidden (goal markers would give the task away), which makes a 64x64 frame cost a
few milliseconds on a CPU through Mesa's EGL.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from vlamp.precision.errors import VlampError
from vlamp.sim.tasks import Task

os.environ.setdefault("MUJOCO_GL", "egl")

CAMERA = "corner"  # sees the gripper and the object in every scene of the default suite
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "grip")


@dataclasses.dataclass
class Observation:
    """``image``: (H, W, 3) uint8; ``state``: (4,) float32 hand xyz + gripper opening."""

    image: np.ndarray
    state: np.ndarray
    instruction: str


class MetaWorldEnv:
    """A seeded Meta-World environment with headless rendering and its scripted expert.

    Args:
        task: The task.
        image_size: Side of the square camera image.
        max_steps: Episode limit (Meta-World's own is 500).

    Example:
        >>> env = MetaWorldEnv(TASKS["drawer-open"])     # doctest: +SKIP
        >>> obs = env.reset(seed=0); obs.image.shape
        (64, 64, 3)
    """

    def __init__(self, task: Task, image_size: int = 64, max_steps: int = 200) -> None:
        import metaworld
        import metaworld.policies
        import mujoco

        if image_size < 8:
            raise VlampError(f"image_size must be >= 8, got {image_size}")
        self.task, self.image_size, self.max_steps = task, image_size, max_steps
        env = metaworld.ALL_V3_ENVIRONMENTS[task.env_name]()
        # Goal-observable, with per-reset random object positions drawn from the env's own seeded RNG.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = max(max_steps, 1)
        self._env = env
        env.model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(env.model, image_size, image_size)
        self._scene_option = mujoco.MjvOption()
        self._scene_option.sitegroup[:] = 0
        self._off = [mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX]
        self._expert = getattr(metaworld.policies, task.expert)()
        self._raw: np.ndarray | None = None
        self.steps = 0

    def reset(self, seed: int) -> Observation:
        """Starts an episode whose object positions are fixed by ``seed``."""
        self._env.seed(int(seed))
        self._raw, _ = self._env.reset()
        self.steps = 0
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, bool, bool]:
        """Applies a 4-d action (clipped to [-1, 1]). Returns ``(obs, success, done)``."""
        if self._raw is None:
            raise RuntimeError("MetaWorldEnv.step before reset")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        self._raw, _, _, _, info = self._env.step(action)
        self.steps += 1
        success = bool(info.get("success", 0.0))
        return self._observe(), success, success or self.steps >= self.max_steps

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (it reads the privileged state)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": clipped in step()
            return np.clip(self._expert.get_action(self._raw), -1.0, 1.0).astype(np.float32)

    def render(self) -> np.ndarray:
        r = self._renderer
        r.update_scene(self._env.data, camera=CAMERA, scene_option=self._scene_option)
        for flag in self._off:
            r.scene.flags[flag] = False
        return np.ascontiguousarray(r.render()[::-1])  # MuJoCo's image rows run bottom-up

    def _observe(self) -> Observation:
        state = np.asarray(self._raw[:4], dtype=np.float32)
        return Observation(self.render(), state, self.task.instruction)

    def close(self) -> None:
        self._renderer.close()
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
