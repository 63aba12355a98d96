"""The task suite: Meta-World environments, their scripted experts and their instructions."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

from vlamp.precision.errors import VlampError


@dataclasses.dataclass(frozen=True)
class Task:
    """One language-conditioned task.

    Attributes:
        name: vlamp's name, Meta-World's without ``-v3`` (``"drawer-open"``).
        env_name: Meta-World's environment name (``"drawer-open-v3"``).
        expert: Class name of Meta-World's scripted expert in ``metaworld.policies``.
        instruction: What the policy is told (at most 8 words: the tokenizer's default length).
        show_goal: Render the goal marker. For tasks whose goal is a point in free space (reach,
            push, pick-place, ...) nothing else shows the policy where to go; elsewhere the marker
            stays hidden, since in paired scenes (drawer open/close) it would give the task away.
    """

    name: str
    env_name: str
    expert: str
    instruction: str
    show_goal: bool = False


def _task(name: str, instruction: str, *, show_goal: bool = False, expert: str | None = None) -> Task:
    camel = "".join(w.capitalize() for w in name.split("-"))
    return Task(name, f"{name}-v3", expert or f"Sawyer{camel}V3Policy", instruction, show_goal)


# All 50 Meta-World v3 tasks. Paired tasks share a scene, so the instruction is the only cue which
# of the two to do.
TASKS: dict[str, Task] = {t.name: t for t in (
    _task("assembly", "put the ring on the peg"),
    _task("basketball", "dunk the ball into the hoop"),
    _task("bin-picking", "move the cube to the other bin"),
    _task("box-close", "put the lid on the box"),
    _task("button-press-topdown", "press the button down from above"),
    _task("button-press-topdown-wall", "press the button down behind the wall"),
    _task("button-press", "press the button"),
    _task("button-press-wall", "press the button past the wall"),
    _task("coffee-button", "press the button of the coffee machine"),
    _task("coffee-pull", "pull the mug from the coffee machine", show_goal=True),
    _task("coffee-push", "push the mug under the coffee machine"),
    _task("dial-turn", "turn the dial"),
    _task("disassemble", "take the ring off the peg"),
    _task("door-close", "close the door"),
    _task("door-lock", "lock the door"),
    _task("door-open", "open the door"),
    _task("door-unlock", "unlock the door"),
    _task("hand-insert", "put the cube into the hole"),
    _task("drawer-close", "close the drawer"),
    _task("drawer-open", "open the drawer"),
    _task("faucet-open", "turn the faucet on"),
    _task("faucet-close", "turn the faucet off"),
    _task("hammer", "hammer the nail in"),
    _task("handle-press-side", "press the handle down from the side"),
    _task("handle-press", "press the handle down"),
    _task("handle-pull-side", "pull the handle up from the side"),
    _task("handle-pull", "pull the handle up"),
    _task("lever-pull", "pull the lever up"),
    _task("pick-place-wall", "place the puck over the wall", show_goal=True),
    _task("pick-out-of-hole", "pick the cube out of the hole", show_goal=True),
    _task("pick-place", "place the puck at the target", show_goal=True),
    _task("plate-slide", "slide the plate into the net"),
    _task("plate-slide-side", "slide the plate sideways into the net"),
    _task("plate-slide-back", "slide the plate out of the net"),
    _task("plate-slide-back-side", "slide the plate sideways out of the net"),
    _task("peg-insert-side", "insert the peg into the hole", expert="SawyerPegInsertionSideV3Policy"),
    _task("peg-unplug-side", "unplug the peg"),
    _task("soccer", "kick the ball into the goal"),
    _task("stick-push", "push the bottle with the stick"),
    _task("stick-pull", "pull the bottle with the stick"),
    _task("push", "push the puck to the target", show_goal=True),
    _task("push-wall", "push the puck around the wall", show_goal=True),
    _task("push-back", "pull the puck back to the target", show_goal=True),
    _task("reach", "reach the target", show_goal=True),
    _task("reach-wall", "reach the target past the wall", show_goal=True),
    _task("shelf-place", "put the block on the shelf"),
    _task("sweep-into", "sweep the cube into the hole"),
    _task("sweep", "sweep the cube off the table"),
    _task("window-open", "open the window"),
    _task("window-close", "close the window"),
)}

DEFAULT_SUITE: tuple[str, ...] = (
    "drawer-open", "drawer-close", "window-open", "window-close", "faucet-open", "faucet-close",
)

# Named suites, usable wherever a task list is. MT10 and MT50 are Meta-World's multi-task
# benchmarks (metaworld.env_dict.MT10_V3 and MT50_V3, in their order; tested).
SUITES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_SUITE,
    "mt10": ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
             "button-press-topdown", "peg-insert-side", "window-open", "window-close"),
    "mt50": tuple(TASKS),
}


# Meta-World's tasks by difficulty, the grouping SmolVLA's MT50 table reports (Seo et al. 2022,
# "Masked World Models for Visual Control", as LeRobot's metaworld_config.json lists it): easy 28,
# medium 11, hard 6, very hard 5 (tested: every task in exactly one group).
DIFFICULTY: dict[str, tuple[str, ...]] = {
    "easy": ("button-press", "button-press-topdown", "button-press-topdown-wall", "button-press-wall",
             "coffee-button", "dial-turn", "door-close", "door-lock", "door-open", "door-unlock",
             "drawer-close", "drawer-open", "faucet-close", "faucet-open", "handle-press",
             "handle-press-side", "handle-pull", "handle-pull-side", "lever-pull", "plate-slide",
             "plate-slide-back", "plate-slide-back-side", "plate-slide-side", "reach", "reach-wall",
             "window-close", "window-open", "peg-unplug-side"),
    "medium": ("basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer",
               "peg-insert-side", "push-wall", "soccer", "sweep", "sweep-into"),
    "hard": ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back"),
    "very hard": ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall"),
}


def difficulty_groups(tasks: Sequence[str]) -> dict[str, list[str]]:
    """Meta-World's difficulty groups among ``tasks`` (:data:`DIFFICULTY`, in its order): group ->
    its tasks, in the order given; tasks in no group (vlamp's own) are left out."""
    group_of = {task: g for g, members in DIFFICULTY.items() for task in members}
    groups: dict[str, list[str]] = {g: [] for g in DIFFICULTY}
    for task in tasks:
        if task in group_of:
            groups[group_of[task]].append(task)
    return {g: members for g, members in groups.items() if members}


def resolve_tasks(names: str | Sequence[str] | None) -> list[Task]:
    """Turns ``"mt10,drawer-close"`` (task names and suite names, mixed; or a list; or ``None`` for
    the default suite) into tasks, each once, in the order given.

    Raises:
        VlampError: On an unknown name; the message names the closest one and lists the suites
            and tasks.
    """
    if names is None:
        names = DEFAULT_SUITE
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: dict[str, Task] = {}
    for n in names:
        key = n.strip().lower().removesuffix("-v3")
        if key in SUITES:
            out.update((t, TASKS[t]) for t in SUITES[key])
        elif key in TASKS:
            out[key] = TASKS[key]
        else:
            close = difflib.get_close_matches(key, [*SUITES, *TASKS], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise VlampError(f"unknown task {n.strip()!r}; {hint}{legal_names()}")
    if not out:
        raise VlampError(f"no tasks given; {legal_names()}")
    return list(out.values())


def legal_names() -> str:
    """The legal task-list words, for errors and ``--help``."""
    return f"suites: {', '.join(SUITES)}; tasks: {', '.join(TASKS)}"


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
