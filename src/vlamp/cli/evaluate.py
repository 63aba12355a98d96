"""``vlamp eval``: closed-loop success of a policy in the simulator."""

from __future__ import annotations

import argparse
import json
import os

from vlamp.precision.errors import VlampError
from vlamp.sim.tasks import DEFAULT_SUITE, TASKS

POLICIES = ("expert", "random")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="closed-loop success in the simulator",
                       description="Run a policy in Meta-World for N seeded episodes per task and "
                                   "report per-task and mean success (95%% Wilson intervals), mean "
                                   "episode length and environment steps per second.")
    p.add_argument("--policy", default="expert", help=f"one of {', '.join(POLICIES)} (default: expert)")
    p.add_argument("--tasks", default=",".join(DEFAULT_SUITE),
                   help=f"comma-separated task names; valid: {', '.join(TASKS)}")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default: 10)")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default: the eval range)")
    p.add_argument("--replan-every", type=int, default=8, help="actions executed per chunk (default: 8)")
    p.add_argument("--max-steps", type=int, default=200, help="episode limit (default: 200)")
    p.add_argument("--image-size", type=int, default=64, help="camera image side (default: 64)")
    p.add_argument("--gif", default=None, metavar="FILE", help="save the first episode of each task")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlamp.sim.evaluate import EVAL_SEED, ExpertPolicy, RandomPolicy, evaluate
    from vlamp.sim.tasks import resolve_tasks

    if args.policy not in POLICIES:
        raise VlampError(f"unknown policy {args.policy!r}; legal: {', '.join(POLICIES)}")
    if args.episodes < 1:
        raise VlampError(f"--episodes must be >= 1, got {args.episodes}")
    resolve_tasks(args.tasks)  # fail on a bad name before the simulator starts
    for path in (args.json, args.gif):
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise VlampError(f"cannot write {path!r}: its directory is missing or not writable")
    policy = ExpertPolicy() if args.policy == "expert" else RandomPolicy(seed=0)
    result = evaluate(policy, args.tasks, args.episodes,
                      seed=EVAL_SEED if args.seed is None else args.seed,
                      replan_every=args.replan_every, image_size=args.image_size,
                      max_steps=args.max_steps, gif_path=args.gif)
    print(result.table())
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump({"policy": args.policy, **result.as_dict()}, f, indent=2)
        os.replace(tmp, args.json)
    return 0
