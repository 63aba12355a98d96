"""The task suite: Meta-World environments, their scripted experts and their instructions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vlamp.precision.errors import VlampError


@dataclasses.dataclass(frozen=True)
class Task:
    """One language-conditioned task.

    Attributes:
        name: vlamp's name (``"drawer-open"``).
        env_name: Meta-World's environment name (``"drawer-open-v3"``).
        expert: Class name of Meta-World's scripted expert in ``metaworld.policies``.
        instruction: What the policy is told.
    """

    name: str
    env_name: str
    expert: str
    instruction: str


def _task(name: str, expert: str, instruction: str) -> Task:
    return Task(name, f"{name}-v3", expert, instruction)


# Paired tasks share a scene, so the instruction is the only cue which of the two to do.
TASKS: dict[str, Task] = {t.name: t for t in (
    _task("drawer-open", "SawyerDrawerOpenV3Policy", "open the drawer"),
    _task("drawer-close", "SawyerDrawerCloseV3Policy", "close the drawer"),
    _task("window-open", "SawyerWindowOpenV3Policy", "open the window"),
    _task("window-close", "SawyerWindowCloseV3Policy", "close the window"),
    _task("faucet-open", "SawyerFaucetOpenV3Policy", "turn the faucet on"),
    _task("faucet-close", "SawyerFaucetCloseV3Policy", "turn the faucet off"),
    _task("button-press", "SawyerButtonPressV3Policy", "press the button"),
    _task("door-open", "SawyerDoorOpenV3Policy", "open the door"),
    _task("reach", "SawyerReachV3Policy", "reach the target"),
)}

DEFAULT_SUITE: tuple[str, ...] = (
    "drawer-open", "drawer-close", "window-open", "window-close", "faucet-open", "faucet-close",
)


def resolve_tasks(names: str | Sequence[str] | None) -> list[Task]:
    """Turns ``"drawer-open,window-close"`` (or a list, or ``None`` for the default suite) into tasks.

    Raises:
        VlampError: On an unknown name; the message lists the valid ones.
    """
    if names is None:
        names = DEFAULT_SUITE
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        key = n.strip().removesuffix("-v3")
        if key not in TASKS:
            raise VlampError(f"unknown task {n!r}; valid: {', '.join(TASKS)}")
        out.append(TASKS[key])
    if not out:
        raise VlampError(f"no tasks given; valid: {', '.join(TASKS)}")
    return out


def tasks_for_instructions(instructions: Sequence[str]) -> list[Task]:
    """The simulator tasks a dataset's instructions belong to.

    Raises:
        VlampError: If an instruction is not one of the known tasks' (closed-loop evaluation needs
            the simulator task behind every instruction).
    """
    by_text = {t.instruction: t for t in TASKS.values()}
    unknown = [i for i in instructions if i not in by_text]
    if unknown:
        raise VlampError(f"no simulator task for instruction(s) {unknown}; known: "
                         f"{', '.join(repr(t) for t in by_text)}")
    return [by_text[i] for i in instructions]
