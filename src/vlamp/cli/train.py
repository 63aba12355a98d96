"""``vlamp train``: train TinyVLA from a YAML config plus dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  vlamp train train.steps=3000 precision.mode=bf16-mixed output_dir=runs/bf16
  vlamp train --config my.yaml train.batch_size=32
  vlamp train --config mt10 output_dir=runs/mt10       # Meta-World MT10: data, training, evaluation
  vlamp train output_dir=runs/bf16 resume=true       # continue from the newest valid checkpoint
  torchrun --standalone --nproc-per-node 2 -m vlamp train distributed.strategy=fsdp \
      precision.mode=bf16-mixed train.batch_size=32   # 2 ranks x 32: the same steps as 1 x 64

config keys (KEY=VALUE, or --KEY=VALUE):
"""


FROM_DATA = ("model.vocab_size", "model.state_dim", "model.action_dim", "model.image_size")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vlamp.train.config import RunConfig
    from vlamp.train.config_io import keys

    defaults = RunConfig()
    lines = []
    width = max(len(k) for k in keys()) + 2
    for key in keys():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        note = "  (set from the dataset)" if key in FROM_DATA else ""
        lines.append(f"  {key:<{width}} default: {value!r}{note}")
    p = sub.add_parser(
        "train", help="train a policy (config file + key=value overrides)",
        description="Train a policy (model.name: TinyVLA, or hf-vlm) by behaviour cloning on a "
                    "LeRobot v3.0 dataset (default: the scripted expert's demonstrations of "
                    "dataset.tasks, the 6-task suite unless set, generated on first use), in the "
                    "chosen precision. "
                    "Writes config.yaml, checkpoints/, metrics.jsonl and TensorBoard events (tb/) "
                    "to output_dir, then evaluates closed-loop.",
        epilog=EXAMPLES + "\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML config file, or a recipe of vlamp's by name: mt10 (Meta-World "
                        "MT10), mt50 (MT50); keys given after it win")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, allow_extra=True)


def run(args: argparse.Namespace) -> int:
    from vlamp.train import distributed
    from vlamp.train.config_io import load_config
    from vlamp.train.trainer import Trainer

    config = load_config(args.config, list(args.overrides) + list(getattr(args, "extra", [])))
    try:
        trainer = Trainer(config, progress=not args.no_progress)
        if trainer.world.main:
            _report(trainer, config)
        else:
            trainer.fit()
        # the ranks leave together: a rank tearing its process group down while another still
        # prints its report was seen to abort at exit ("terminate called without an active
        # exception", once in CI)
        distributed.barrier(trainer.world)
    finally:
        distributed.close()
    return 0


def _report(trainer, config) -> None:
    from vlamp.sim.evaluate import group_line

    first = trainer.step
    world, t = trainer.world, config.train
    ranks = (f" x {world.size} ranks ({config.distributed.strategy}, {world.backend})"
             if world.distributed else "")
    print(f"precision {trainer.mp.mode.name} (asked: {config.precision.mode}) on {trainer.device}; "
          f"{trainer.num_params:,} parameters; "
          f"{len(trainer.train_set):,} training samples; effective batch {trainer.effective_batch} "
          f"= {t.batch_size} x {t.grad_accum} accumulated{ranks}; run dir {trainer.run_dir}"
          + (f"; resumed at step {first}" if first else ""))
    for line in trainer.mp.parallel_notes:
        print(line)
    measured = trainer.mp.plan.measured or {}
    if measured.get("reason"):
        cached = f" (cached plan: {measured['cache_path']})" if measured.get("from_cache") else ""
        print(f"precision plan: {measured['reason']}{cached}")
    result = trainer.fit()
    trained = len(result.losses)
    span = f" (steps {first + 1}-{first + trained})" if first else ""
    print(f"trained {trained} steps{span} in {result.seconds:.0f} s; skipped {result.skipped_steps}; "
          f"final loss {result.losses[-1]:.4f}" if result.losses else "nothing to train")
    if result.val_action_l1 is not None:
        print(f"validation action L1 (normalized) {result.val_action_l1:.4f}")
    if result.eval is not None:
        print(f"closed-loop success {result.eval['success_rate']:.0%} +- "
              f"{result.eval['ci95_half_width'] * 100:.0f} points (95%) over "
              f"{result.eval['episodes']} episodes: "
              + ", ".join(f"{t['task']} {t['successes']}/{t['episodes']}" for t in result.eval["per_task"]))
        groups = {g: (v["success_rate"], v["tasks"]) for g, v in result.eval["groups"].items()}
        if len(groups) > 1:
            print(group_line(groups))
    print(f"checkpoints in {trainer.run_dir / 'checkpoints'}; "
          f"evaluate with: vlamp eval --checkpoint {trainer.run_dir}")

