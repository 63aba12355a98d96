"""``vlamp eval``: closed-loop success of a policy in the simulator."""

from __future__ import annotations

import argparse
import functools
import os

from vlamp.io import write_json
from vlamp.precision.errors import VlampError
from vlamp.sim.env import CAMERAS, DEFAULT_CAMERA, NAMED_CAMERAS, check_camera
from vlamp.sim.evaluate import ENSEMBLE, EPISODES, MAX_STEPS, METAWORLD_MAX_STEPS, REPLAN_EVERY
from vlamp.sim.tasks import DEFAULT_SUITE, SUITES

POLICIES = ("expert", "random")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="closed-loop success in the simulator",
                       description="Run a policy in Meta-World for N seeded episodes per task and "
                                   "report per-task and mean success (95% Wilson intervals), mean "
                                   "episode length and environment steps per second. With --compare A "
                                   "B, two checkpoints run on the same episodes and the paired "
                                   "difference in success is reported with its interval and test.")
    p.add_argument("--policy", default="expert", help=f"one of {', '.join(POLICIES)} (default: expert)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="evaluate a trained policy: a run directory (its newest valid checkpoint) "
                        "or a checkpoints/step_* directory; replaces --policy")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="evaluate two checkpoints (run directories or step_* directories) on the "
                        "same episodes and say whether B's success differs from A's: the difference "
                        "with its 95%% interval and McNemar's exact test on the paired episodes")
    p.add_argument("--mode", default=None, help="with --checkpoint or --compare: run in this precision mode "
                                                "(default: the mode it was trained in)")
    p.add_argument("--no-ema", action="store_true", help="with --checkpoint or --compare: use the live weights "
                                                         "even when EMA weights were saved")
    p.add_argument("--device", default="auto",
                   help="with --checkpoint or --compare: where the policy computes: auto (CUDA when present), "
                        "cpu, cuda, cuda:N; the simulator always runs on the CPU (default: auto)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task and suite names, mixed as you like (default: the "
                        f"6-task suite, or the checkpoint's tasks); suites: {', '.join(SUITES)}; "
                        f"the 50 task names are Meta-World's without -v3 (mt50 is all of them)")
    p.add_argument("--episodes", type=int, default=EPISODES,
                   help=f"episodes per task (default: {EPISODES}; the mean's 95%% interval is "
                        f"printed, with the episodes that would make it +-5 points)")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default: the eval range)")
    p.add_argument("--replan-every", type=int, default=REPLAN_EVERY,
                   help=f"steps between queries of the policy, at most a chunk (default: {REPLAN_EVERY})")
    p.add_argument("--ensemble", type=float, default=ENSEMBLE, metavar="K",
                   help=f"temporal ensembling: each step's action averages every chunk's prediction "
                        f"for it, weights exp(-K * i) from the oldest; 0: off (default: {ENSEMBLE})")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"episode limit (default: {MAX_STEPS} on the default suite's tasks, "
                        f"Meta-World's own {METAWORLD_MAX_STEPS} on any other, the limit MT10 and "
                        f"MT50 results are published at)")
    p.add_argument("--image-size", type=int, default=None,
                   help="camera image side (default: 64, or the checkpoint's)")
    p.add_argument("--camera", default=None,
                   help=f"what the images are rendered from: {', '.join([*CAMERAS, *NAMED_CAMERAS])} "
                        f"(default: {DEFAULT_CAMERA}, or the checkpoint's)")
    p.add_argument("--gif", default=None, metavar="FILE", help="save the first episode of each task")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="processes the tasks are spread over, one torch thread each, as the "
                        "policy has in one process (auto: one per core, 1 with --gif). Same "
                        "episodes, same seeds, the same results (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlamp.sim.evaluate import EVAL_SEED, ExpertPolicy, RandomPolicy, evaluate
    from vlamp.sim.tasks import resolve_tasks

    if args.policy not in POLICIES:
        raise VlampError(f"unknown policy {args.policy!r}; legal: {', '.join(POLICIES)}")
    if args.episodes < 1:
        raise VlampError(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_steps is not None and args.max_steps < 1:
        raise VlampError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.checkpoint and args.compare:
        raise VlampError("--checkpoint and --compare exclude each other (--compare A B evaluates both)")
    if args.tasks is not None:
        resolve_tasks(args.tasks)  # fail on a bad name before the simulator starts
    for path in (args.json, args.gif):
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise VlampError(f"cannot write {path!r}: its directory is missing or not writable")
    text = str(args.workers).strip().lower()
    if text == "auto":
        args.workers = 1 if args.gif else os.cpu_count() or 1
    elif text.isdigit() and int(text) >= 1:
        args.workers = int(text)
    else:
        raise VlampError(f"--workers must be a count >= 1 or auto, got {args.workers!r}")
    if args.workers > 1 and args.gif:
        raise VlampError("--gif records in one process: use it with --workers 1")
    seed = EVAL_SEED if args.seed is None else args.seed

    def run_one(policy, tasks: str, image_size: int, camera: str, gif: str | None = None):
        """``policy``: the policy, or with --workers > 1 the recipe each process builds it from."""
        return evaluate(policy, tasks, args.episodes, seed=seed, replan_every=args.replan_every,
                        ensemble=args.ensemble,
                        image_size=image_size, camera=camera, max_steps=args.max_steps, gif_path=gif,
                        progress=not args.no_progress, workers=args.workers)

    if args.compare:
        return _compare(args, run_one)
    tasks, image_size, name = args.tasks or ",".join(DEFAULT_SUITE), args.image_size or 64, args.policy
    camera = check_camera(args.camera or DEFAULT_CAMERA)
    if args.checkpoint:
        policy, (image_size, camera), name, own_tasks = _load(args, args.checkpoint)
        tasks = args.tasks or own_tasks
    else:
        recipe = ExpertPolicy if args.policy == "expert" else functools.partial(RandomPolicy, seed=0)
        policy = recipe if args.workers > 1 else recipe()
    result = run_one(policy, tasks, image_size, camera, args.gif)
    print(result.table())
    if args.policy == "expert" and not args.checkpoint:
        weak = [t for t in result.tasks if t.successes < 0.9 * t.episodes]
        for t in weak:
            print(f"note: the scripted expert itself succeeds in only {t.successes}/{t.episodes} "
                  f"episodes of {t.task}: a policy learned from it is bounded by that")
    if args.json:
        write_json({"policy": name, **result.as_dict()}, args.json)
    return 0


def _load(args: argparse.Namespace, path: str):
    """A checkpoint's policy, what it sees (image size, camera), a name for it and its tasks (as a
    task list)."""
    from vlamp.sim.tasks import tasks_for_instructions
    from vlamp.train.policy import load_policy, policy_recipe

    loaded = load_policy(path, args.mode, not args.no_ema, device=args.device)
    policy, image_size = loaded.policy, loaded.image_size
    if args.image_size not in (None, image_size):
        raise VlampError(f"--image-size {args.image_size}: the checkpoint {path} was trained on "
                         f"{image_size}x{image_size} images")
    if args.camera not in (None, loaded.camera):
        raise VlampError(f"--camera {args.camera}: the checkpoint {path} was trained on images from "
                         f"{loaded.camera}")
    name = f"checkpoint {path} (step {loaded.step})"
    print(f"policy {name}: precision {policy.mp.mode.name}, head "
          f"{loaded.config['model']['head']}, on {policy.device}")
    tasks = ",".join(t.name for t in tasks_for_instructions(loaded.instructions))
    if args.workers > 1:  # each process loads it again
        policy = policy_recipe(path, args.mode, not args.no_ema, args.device)
    return policy, (image_size, loaded.camera), name, tasks


def _compare(args: argparse.Namespace, run_one) -> int:
    """``--compare A B``: both checkpoints on the same episodes, then the paired comparison."""
    from vlamp.sim.compare import compare_paired

    (pa, view_a, name_a, tasks_a), (pb, view_b, name_b, tasks_b) = (_load(args, p) for p in args.compare)
    if view_a != view_b:
        raise VlampError(f"--compare: the checkpoints see different images ({view_a[0]} px from "
                         f"{view_a[1]} and {view_b[0]} px from {view_b[1]})")
    if args.tasks is None and tasks_a != tasks_b:
        raise VlampError(f"--compare: the checkpoints were trained on different tasks ({tasks_a} and "
                         f"{tasks_b}); name the tasks to compare on with --tasks")
    tasks = args.tasks or tasks_a
    results = []
    for label, policy in (("A", pa), ("B", pb)):
        print(f"\n{label}: {name_a if label == 'A' else name_b}")
        results.append(run_one(policy, tasks, *view_a))
        print(results[-1].table())
    comparison = compare_paired(*results)
    print("\n" + comparison.text())
    if args.json:
        write_json({"a": {"policy": name_a, **results[0].as_dict()},
                    "b": {"policy": name_b, **results[1].as_dict()},
                    "comparison": comparison.as_dict()}, args.json)
    return 0
