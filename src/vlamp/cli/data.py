"""``vlamp data generate``: scripted-expert Meta-World demonstrations as a LeRobot v3.0 dataset."""

from __future__ import annotations

import argparse
import time

from vlamp.data.generate import GIVE_UP, MAX_TRIES
from vlamp.sim.env import CAMERAS, DEFAULT_CAMERA, NAMED_CAMERAS
from vlamp.sim.tasks import DEFAULT_SUITE, SUITES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate demonstration datasets",
                       description="Demonstration datasets in the LeRobot v3.0 layout.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(p))
    g = dsub.add_parser("generate", help="scripted-expert demonstrations in Meta-World",
                        description="Roll out Meta-World's scripted experts (headless MuJoCo), keep "
                                    "the successful episodes and write them as a LeRobot v3.0 "
                                    "dataset. Deterministic for a seed; uses all cores.")
    g.add_argument("--tasks", default=",".join(DEFAULT_SUITE),
                   help=f"comma-separated task and suite names, mixed as you like (default: the "
                        f"6-task suite); suites: {', '.join(SUITES)}; the 50 task names are "
                        f"Meta-World's without -v3 (mt50 is all of them)")
    g.add_argument("--episodes-per-task", type=int, default=25, metavar="N", help="default: 25")
    g.add_argument("--image-size", type=int, default=64, help="camera image side in pixels (default: 64)")
    g.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where to write (must not exist); default: the user cache, reused if present")
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    g.add_argument("--max-steps", type=int, default=200, help="episode limit (default: 200)")
    g.add_argument("--camera", default=DEFAULT_CAMERA,
                   help=f"what the images are rendered from: {', '.join([*CAMERAS, *NAMED_CAMERAS])} "
                        f"(default: {DEFAULT_CAMERA}, vlamp's view of the workspace; the others are "
                        f"Meta-World's own)")
    g.add_argument("--max-tries", type=int, default=MAX_TRIES, metavar="N",
                   help=f"rollouts tried per episode before it counts as failed; a task is given up "
                        f"after {GIVE_UP} failed episodes in a row and the others go on "
                        f"(default: {MAX_TRIES})")
    g.set_defaults(run=run_generate)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def run_generate(args: argparse.Namespace) -> int:
    from vlamp.data.generate import generate, generation_report
    from vlamp.data.reader import read_dataset

    start = time.perf_counter()
    root = generate(args.tasks, args.episodes_per_task, image_size=args.image_size, seed=args.seed,
                    out=args.out, workers=args.workers, max_steps=args.max_steps,
                    max_tries=args.max_tries, camera=args.camera)
    data = read_dataset(root, stream=True)  # decodes the frames once, for training to read
    print(f"{root}\n  {data.num_episodes} episodes, {len(data)} frames, {len(data.tasks)} tasks, "
          f"{data.images.shape[1]}x{data.images.shape[2]} images from {args.camera}, "
          f"{time.perf_counter() - start:.1f} s")
    report = generation_report(root)
    if report:
        tasks = report["tasks"]
        w = max(len(n) for n in tasks)
        print(f"  {'task':<{w}}  episodes  expert success (rollouts)")
        for name, st in tasks.items():
            rate = st["expert_success_rate"]
            note = "  given up" if st["given_up"] else ""
            print(f"  {name:<{w}}  {st['kept']:>3}/{st['asked']:<4}  "
                  f"{'-' if rate is None else f'{rate:.0%}':>5} ({st['rollouts']}){note}")
    return 0
