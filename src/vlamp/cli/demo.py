"""``vlamp demo``: the whole flow on the embedded default: data -> precision -> train -> evaluate
-> bench -> report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlamp.sim.evaluate import EPISODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole flow on the default suite: data, precision, train, eval, bench, report",
        description="Generate the 6-task Meta-World dataset (cached), choose the precision for this "
                    "machine and say why, train TinyVLA in it, evaluate it closed-loop, bench fp32 "
                    "against the chosen mode, and write the report. About 10-15 minutes on 2 CPU "
                    "cores; --quick runs a tiny model on a tiny dataset in about 2.")
    p.add_argument("--quick", action="store_true", help="tiny model, tiny dataset, few steps")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="default: runs/demo")
    p.add_argument("--mode", default="auto", help="precision mode to train in (default: auto)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 800; --quick: 20)")
    p.add_argument("--episodes", type=int, default=None,
                   help=f"closed-loop episodes per task (default: {EPISODES}, as vlamp eval; "
                        f"--quick: 1)")
    p.add_argument("--bench-steps", type=int, default=None,
                   help="steps per bench run (default: 12; --quick: 6; where bf16 is only "
                        "emulated: 3, an emulated step costs seconds and a few say the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlamp.bench.report import text_table
    from vlamp.bench.run import quick_overrides
    from vlamp.io import write_json
    from vlamp.precision.errors import VlampError
    from vlamp.precision.hardware import choose_mode, detect, resolve_device
    from vlamp.precision.modes import MODE_NAMES
    from vlamp.train.config_io import load_config
    from vlamp.train.trainer import Trainer, load_data

    if args.mode != "auto" and args.mode not in MODE_NAMES:
        raise VlampError(f"unknown mode {args.mode!r}; legal: auto, {', '.join(MODE_NAMES)}")
    for name in ("steps", "episodes", "bench_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VlampError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out)
    if (out / "train" / "checkpoints").exists():
        raise VlampError(f"{out} holds an earlier demo; remove it or pass --out")
    progress = not args.no_progress
    steps = args.steps or (20 if args.quick else 800)
    episodes = args.episodes or (1 if args.quick else EPISODES)
    started = time.time()

    print("[1/5] data: the 6-task Meta-World suite" if not args.quick else
          "[1/5] data: 2 tasks x 3 episodes at 32x32 (--quick)", flush=True)
    base = quick_overrides() if args.quick else []
    config = load_config(None, base + [f"train.steps={steps}", f"eval.episodes={episodes}",
                                       f"output_dir={out / 'train'}", "train.save_every=0",
                                       "train.val_every=0"])
    data = load_data(config, progress)
    print(f"      {len(data):,} frames, {data.num_episodes} episodes, tasks: {', '.join(data.tasks)}")

    hw = detect(resolve_device(config.train.device))
    config.precision.mode = args.mode
    trainer = Trainer(config, data=data, progress=progress)  # measures the plan (cached) for auto
    mode = trainer.mp.mode.name
    measured = trainer.mp.plan.measured or {}
    why = measured.get("reason") or (
        "asked for with --mode" if args.mode != "auto" else choose_mode(hw).reason)
    if measured.get("from_cache"):
        why += "; plan from the cache"
    print(f"[2/5] precision: {mode} on {trainer.device} ({why})", flush=True)

    print(f"[3/5] train: TinyVLA, {steps} steps at batch {config.train.batch_size}", flush=True)
    result = trainer.fit()
    print(f"      {result.seconds - result.eval_seconds:.0f} s (and {result.eval_seconds:.0f} s of "
          f"closed-loop evaluation), final loss {result.losses[-1]:.4f}, validation action L1 "
          f"{result.val_action_l1:.4f}, skipped steps {result.skipped_steps}")

    e = result.eval or {}
    print(f"[4/5] evaluate: closed-loop success {e.get('success_rate', 0):.0%} +- "
          f"{e.get('ci95_half_width', 0) * 100:.0f} points over {e.get('episodes', 0)} episodes",
          flush=True)
    for t in e.get("per_task", []):
        print(f"      {t['task']:<14} {t['successes']}/{t['episodes']}")

    results = _bench(config, mode, hw, out, base, args.bench_steps, args.quick, progress)
    summary = {"mode": mode, "reason": why, "train_seconds": result.seconds, "train_steps": steps,
               "val_action_l1": result.val_action_l1, "eval": result.eval,
               "seconds": time.time() - started}
    write_json(summary, out / "demo.json")
    print()
    print(text_table(results))
    print(f"\ndone in {time.time() - started:.0f} s.")
    print(f"  trained policy: {out / 'train'}  (vlamp eval --checkpoint {out / 'train'})")
    print(f"  report:         {out / 'bench' / 'report.html'} and report.md")
    print(f"  TensorBoard:    tensorboard --logdir {out / 'train' / 'tb'}")
    return 0


def _bench(config, mode: str, hw, out: Path, base: list[str], steps: int | None, quick: bool,
           progress: bool) -> list[dict]:
    """Stage 5: fp32 against the chosen mode, or against emulated bf16-mixed where the machine
    chose fp32, each in its own process. Emulated bf16 runs few steps unless asked: a step there
    costs seconds, and ``vlamp doctor`` measures the same ratio in one."""
    from vlamp.bench.run import bench
    from vlamp.precision.hardware import native_formats
    from vlamp.train.config_io import load_config

    other = mode if mode != "fp32" else "bf16-mixed"
    emulated = mode == "fp32" and "bf16" not in native_formats(hw)
    steps = steps or (6 if quick else 3 if emulated else 12)
    notes = [f"{hw.name} has no native bf16: bf16-mixed is benchmarked emulated, {steps} steps, "
             f"to show what it costs"] if emulated else []
    print(f"[5/5] bench: fp32 against {other}, {steps} steps each at batch "
          f"{config.train.batch_size}, each in its own process, taking turns", flush=True)
    bench_config = load_config(None, base + [f"train.steps={steps}"])
    return bench(bench_config, ["fp32", other], out / "bench", warmup=min(2, steps - 1),
                 eval_episodes=0, notes=notes, progress=progress)
