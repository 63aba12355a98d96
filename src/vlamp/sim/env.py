"""One Meta-World task as vlamp sees it: an RGB camera image, proprio state and an instruction.

Rendering is MuJoCo's own offscreen renderer with shadows, reflections, skybox and anti-aliasing off
and the marker sites hidden (in paired scenes a goal marker would give the task away), which makes a
64x64 frame cost a few milliseconds on a CPU through Mesa's EGL. Tasks whose goal is a point in free
space (reach, push, pick-place, ...) show their goal marker, enlarged to be seen at 64 px: nothing
else in the image says where to go.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from vlamp.precision.errors import VlampError
from vlamp.sim.tasks import Task

os.environ.setdefault("MUJOCO_GL", "egl")

GOAL_GROUP = 5  # the site group a shown goal marker is moved to; the only one rendered
GOAL_RADIUS = 0.035  # metres; Meta-World's 0.01-0.02 is one or two pixels at 64 px
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper")

# Free cameras (MuJoCo ``mjvCamera``), usable wherever a camera name is: Meta-World's own cameras
# frame the whole table and the robot's base, so at 64 px a window handle is two pixels. ``workspace``
# looks at the region the objects of all 50 tasks are placed in, from the front left and above, with
# the hand in view over a whole episode: the objects cover about twice the pixels they do in
# ``corner``.
CAMERAS: dict[str, dict[str, object]] = {
    "workspace": {"lookat": (0.0, 0.72, 0.2), "distance": 1.25, "azimuth": -60.0, "elevation": -30.0},
}
DEFAULT_CAMERA = "workspace"
# What every dataset and checkpoint was rendered from before the camera was recorded in them.
UNRECORDED_CAMERA = "corner"
NAMED_CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")

ACTION_NAMES = ("dx", "dy", "dz", "grip")
GL_BACKENDS = {"egl": "EGL", "osmesa": "OSMesa", "glfw": "glfw"}  # MUJOCO_GL -> the library it loads
_DEBIAN = {"egl": "libegl1", "osmesa": "libosmesa6", "glfw": "libglfw3"}


def check_rendering() -> str:
    """The rendering backend MuJoCo will use (``MUJOCO_GL``, vlamp's default ``egl``), checked
    before any simulator starts, so a bad setting is one line instead of tracebacks from every
    worker process.

    Raises:
        VlampError: If ``MUJOCO_GL`` is empty or names no backend MuJoCo has, ``glfw`` has no
            display, or the backend's library is not installed.
    """
    import ctypes.util

    backend = os.environ.get("MUJOCO_GL", "egl").strip().lower()
    headless = "use MUJOCO_GL=egl (headless, vlamp's default) or osmesa"
    if backend not in GL_BACKENDS:
        raise VlampError(f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} names no rendering backend; "
                         f"legal: {', '.join(GL_BACKENDS)} — {headless}, or unset it")
    if backend == "glfw" and not os.environ.get("DISPLAY"):
        raise VlampError(f"MUJOCO_GL=glfw renders into a window and DISPLAY is not set; {headless}")
    if ctypes.util.find_library(GL_BACKENDS[backend]) is None:
        raise VlampError(f"MUJOCO_GL={backend}: the {GL_BACKENDS[backend]} library is not installed "
                         f"(Debian: apt-get install {_DEBIAN[backend]}); or use another backend: "
                         f"{', '.join(b for b in GL_BACKENDS if b != backend)}")
    return backend


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
        camera: A free camera of :data:`CAMERAS` or one of Meta-World's named cameras.

    Example:
        >>> env = MetaWorldEnv(TASKS["drawer-open"])     # doctest: +SKIP
        >>> obs = env.reset(seed=0); obs.image.shape
        (64, 64, 3)
    """

    def __init__(self, task: Task, image_size: int = 64, max_steps: int = 200,
                 camera: str = DEFAULT_CAMERA) -> None:
        check_rendering()
        import metaworld
        import metaworld.policies
        import mujoco

        if image_size < 8:
            raise VlampError(f"image_size must be >= 8, got {image_size}")
        self.task, self.image_size, self.max_steps = task, image_size, max_steps
        self.camera = check_camera(camera)
        env = metaworld.ALL_V3_ENVIRONMENTS[task.env_name]()
        # Goal-observable, with per-reset random object positions drawn from the env's own seeded RNG.
        env._partially_observable = False
        # The observation bounds were cached at construction, when the goal was hidden: bounds of
        # zero, to which every step's observation is clipped. Dropped, they are computed again with
        # the goal's range, or each step hands the expert a goal at the origin.
        env.__dict__.pop("sawyer_observation_space", None)
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = max(max_steps, 1)
        self._env = env
        env.model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(env.model, image_size, image_size)
        self._scene_option = mujoco.MjvOption()
        self._scene_option.sitegroup[:] = 0
        self._goal_shown = not task.show_goal
        self._view: str | mujoco.MjvCamera = self.camera
        if self.camera in CAMERAS:
            self._view = mujoco.MjvCamera()
            self._view.type = mujoco.mjtCamera.mjCAMERA_FREE
            preset = CAMERAS[self.camera]
            self._view.lookat[:] = preset["lookat"]
            self._view.distance = preset["distance"]
            self._view.azimuth = preset["azimuth"]
            self._view.elevation = preset["elevation"]
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
        if not self._goal_shown:
            self._show_goal()
        return self._observe()

    def _show_goal(self) -> None:
        """Moves the task's goal marker sites (known once the env has been reset) into the one
        rendered site group, and enlarges them."""
        import mujoco

        model = self._env.model
        for name, _ in self._env._target_site_config:
            sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, name)
            if sid >= 0:
                model.site_group[sid] = GOAL_GROUP
                model.site_size[sid][0] = max(float(model.site_size[sid][0]), GOAL_RADIUS)
        self._scene_option.sitegroup[GOAL_GROUP] = 1
        self._goal_shown = True

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
        r.update_scene(self._env.data, camera=self._view, scene_option=self._scene_option)
        for flag in self._off:
            r.scene.flags[flag] = False
        if self.camera in CAMERAS:
            return r.render()
        return np.ascontiguousarray(r.render()[::-1])  # Meta-World's named cameras are upside down

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


def check_camera(name: str) -> str:
    """Returns ``name`` if it is a camera vlamp can render from.

    Raises:
        VlampError: Naming the legal cameras.
    """
    if name not in CAMERAS and name not in NAMED_CAMERAS:
        raise VlampError(f"unknown camera {name!r}; legal: {', '.join([*CAMERAS, *NAMED_CAMERAS])}")
    return name
