"""``vlamp bench``: speed, memory and quality of precision modes side by side, on this machine."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="compare precision modes: speed, memory, quality lost against fp32",
        description="Train the same model on the same data once per precision mode, each in its own "
                    "process (clean peak memory), plus a hand-written torch.amp loop as a baseline. "
                    "The runs take turns, a round of steps each, so a slow spell hits every mode "
                    "alike; the load of the machine is read around each round and runs timed while "
                    "other processes were busy are flagged. It measures "
                    "median step time, samples/s, casts per step, peak RSS, parameter+gradient+optimizer "
                    "bytes, validation action error, closed-loop success, skipped steps and the loss "
                    "scale. Writes DIR/results.json, DIR/report.md, DIR/report.html and plots.",
        epilog="examples:\n  vlamp bench --quick\n  vlamp bench --modes fp32,bf16-mixed --steps 300 "
               "--seeds 3\n  vlamp bench train.batch_size=32 model.head=flow\n"
               "  vlamp bench --modes bf16-true,bf16-true/kahan,bf16-true/stochastic --seeds 3\n"
               "  vlamp bench --config mt10 --modes fp32,bf16-mixed --seeds 3 --resume   # goes on\n"
               "  vlamp bench --config mt10 --modes fp32,bf16-mixed,fp16-mixed --seeds 3 --resume "
               "--all-seeds   # + seeds kept beyond 3\n"
               "  vlamp bench --modes bf16-mixed,bf16-mixed@precision.lean_islands=0   # A against B\n"
               "  vlamp bench --quick --nproc 2 distributed.strategy=fsdp\n"
               "  vlamp bench --modes fp32,bf16-mixed train.device=cuda model.size=base "
               "dataset.path=DATA_128PX",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=None,
                   help="comma-separated modes; fp32 is always added as the reference (default: fp32 "
                        "and the mixed modes this machine computes natively). A -true or -storage "
                        "mode may name how its weights are updated: bf16-true/kahan, "
                        "bf16-true/stochastic, bf16-true/naive, bf16-storage/kahan (default: the "
                        "mode's own, FP32 masters in -true modes, stochastic in bf16-storage), its "
                        "optimizer state after a plus (fp32+8bit), and config overrides of its own "
                        "after @ signs (bf16-mixed@precision.lean_islands=0: A against B in one run)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: 300, or the --config's train.steps; "
                        "--quick: 10)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with this many seeds")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps left out of the step-time median (default: 10; --quick: 2)")
    p.add_argument("--episodes", type=int, default=None,
                   help="closed-loop episodes per task per run, 0 for none (default: 5, or the "
                        "--config's eval.episodes; --quick: 1)")
    p.add_argument("--no-baseline", action="store_true", help="skip the torch.amp baseline row")
    p.add_argument("--threads", default="auto", metavar="N|auto",
                   help="torch threads per run; auto (default): each run times 1 thread against all "
                        "and takes the faster")
    p.add_argument("--rounds", type=int, default=10,
                   help="the runs take turns in this many rounds each (default: 10)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train every mode on N torchrun ranks (DDP; distributed.strategy=fsdp for "
                        "FSDP2), beside a 1-process fp32 run to compare total throughput with; "
                        "train.batch_size is per rank (default: 1)")
    p.add_argument("--quick", action="store_true", help="a tiny model on a tiny dataset (seconds)")
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="default: runs/bench")
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted benchmark of the same settings in --out: the "
                        "runs it finished (out/seeds/) are read, not run again, and the runs of the "
                        "seed it was in go on from their last round's checkpoint; --seeds may grow "
                        "and --modes gain modes")
    p.add_argument("--all-seeds", action="store_true",
                   help="with --resume: the table also takes every seed --out keeps beyond --seeds, "
                        "for the modes that have one (trains none of them): a row given a seed more "
                        "to narrow its interval keeps it in the table of the whole ablation")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML training config, or a recipe of vlamp's: mt10, mt50")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, allow_extra=True)


def run(args: argparse.Namespace) -> int:
    from vlamp.bench.report import text_table
    from vlamp.bench.run import bench, default_modes, parse_modes
    from vlamp.precision.errors import VlampError
    from vlamp.precision.hardware import resolve_device

    for name in ("steps", "seeds", "rounds", "nproc"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise VlampError(f"--{name} must be >= 1, got {getattr(args, name)}")
    threads = args.threads.strip().lower()
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise VlampError(f"--threads must be a count >= 1 or auto, got {args.threads!r}")
    config, episodes = run_config(args)
    steps = config.train.steps
    device = resolve_device(config.train.device)
    if args.modes:
        modes, notes = parse_modes(args.modes, device)
    else:
        modes, notes = default_modes(device)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    if warmup >= steps:
        raise VlampError(f"--warmup ({warmup}) must be below --steps ({steps})")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        results = bench(config, modes, args.out, seeds=args.seeds, warmup=warmup,
                        eval_episodes=episodes, baseline=not args.no_baseline, notes=notes,
                        progress=not args.no_progress,
                        threads=threads if threads == "auto" else int(threads), rounds=args.rounds,
                        nproc=args.nproc, resume=args.resume,
                        all_seeds=args.all_seeds)
    except KeyboardInterrupt:
        print("vlamp bench: the same command with --resume goes on from the seeds written and "
              "each run's last round", file=sys.stderr)
        raise
    print(text_table(results))
    for note in results["notes"][len(notes):]:  # what the runs showed (seeds planned otherwise)
        print(f"note: {note}")
    print(f"\nresults: {args.out}/results.json; report: {args.out}/report.md, {args.out}/report.html")
    return 0


def run_config(args: argparse.Namespace):
    """The runs' config and the episodes each is evaluated on. Steps and episodes: the flags, else
    a ``--config``'s own (benchmarking a recipe means its training), else a short run of the
    default config (300 steps, 5 episodes per task)."""
    from vlamp.bench.run import quick_overrides
    from vlamp.train.config_io import load_config

    base = quick_overrides() if args.quick else [] if args.config else ["train.steps=300"]
    given = [f"train.steps={args.steps}"] if args.steps else []
    config = load_config(args.config, base + list(args.overrides) + list(getattr(args, "extra", []))
                         + given)
    episodes = args.episodes if args.episodes is not None else \
        1 if args.quick else config.eval.episodes if args.config else 5
    return config, episodes
