"""``vlamp merge RUN --out DIR``: fold a run's LoRA adapters into a plain checkpoint."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="fold a run's LoRA adapters into a plain checkpoint (train.lora)",
        description="Write a checkpoint whose adapted layers hold W + alpha/rank * B A, merged in "
                    "FP32 (and kept in FP32 storage, so the adapters' small product is not rounded "
                    "away), from the EMA weights where the run kept them. vlamp eval loads it like "
                    "any checkpoint; vlamp eval --compare RUN DIR checks it acts as the run did.",
        epilog="example:\n  vlamp train train.lora.rank=8 'train.lora.targets=[trunk.*.qkv]' "
               "output_dir=runs/lora\n  vlamp merge runs/lora --out runs/lora-merged\n"
               "  vlamp eval --compare runs/lora runs/lora-merged",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN", help="a run directory or one of its checkpoints")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged run directory to write")
    p.add_argument("--no-ema", action="store_true", help="merge the trained weights, not their EMA")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlamp.train.merge import merge_checkpoint

    path = merge_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(f"merged checkpoint: {path}")
    return 0
