"""Meta-World (MuJoCo) environments, rendered headless, and closed-loop evaluation.

``MUJOCO_GL`` must be set before MuJoCo is first imported; vlamp defaults it to EGL.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from vlamp.sim.tasks import DEFAULT_SUITE, TASKS, Task, resolve_tasks

__all__ = ["DEFAULT_SUITE", "TASKS", "Task", "resolve_tasks"]
