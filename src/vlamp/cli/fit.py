"""``vlamp fit``: which configuration of a training run fits this machine's memory, predicted."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

EXAMPLES = """examples:
  vlamp fit                                           # the default run, in what is free now
  vlamp fit model.name=hf-vlm model.size=smolvla train.batch_size=8 --budget 24GiB
  vlamp fit model.name=hf-vlm model.size=pi0 train.batch_size=2 --modes bf16-storage
  vlamp fit --largest model.depth model.name=hf-vlm model.dim=2048 model.heads=8 \\
      train.batch_size=8 --modes fp32 --states auto     # the deepest fp32 with FP32 AdamW state
  vlamp train precision.mode=auto train.memory_budget=24GiB ...   # train with the choice
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit", help="predict a run's peak memory per configuration and choose what fits",
        description="Predict the peak memory of a training run (the same config keys as vlamp "
                    "train) by kind — weights, FP32 masters, Kahan buffers, gradients, optimizer "
                    "state, activations, transient copies, data, runtime — for every candidate "
                    "configuration: precision mode x update method x optimizer-state dtype x "
                    "activation checkpointing x micro-batch (accumulating to the same batch). "
                    "State is counted exactly from the precision plan; activations and step time "
                    "are measured on shallow copies of the model (one layer per stack) in a fresh "
                    "process. Prints the table and the fastest configuration that fits.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config file (as vlamp train)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (as vlamp train)")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="memory the run may use, e.g. 24GiB (default: train.memory_budget, else "
                        "what this machine or GPU has free now)")
    p.add_argument("--modes", default=None, metavar="A,B",
                   help="precision modes to consider (default: every mode whose compute format "
                        "is measured at least half as fast as FP32 here, and bf16-storage)")
    p.add_argument("--states", default="auto,8bit", metavar="A,B",
                   help="optimizer-state dtypes to consider: auto (the update method's own: FP32 "
                        "beside FP32 weights) and 8bit (block-wise 8-bit moments); default both")
    p.add_argument("--largest", default=None, metavar="KEY",
                   help="instead: the largest value of a layer count (model.depth or "
                        "model.text_layers) at which some configuration fits the budget")
    p.add_argument("--rows", type=int, default=16, metavar="N", help="table rows to print")
    p.add_argument("--json", action="store_true", help="every prediction as JSON")
    p.set_defaults(run=run, allow_extra=True)


def run(args: argparse.Namespace) -> int:
    from vlamp.models.tokenizer import WordTokenizer
    from vlamp.precision.errors import VlampError
    from vlamp.precision.hardware import resolve_device
    from vlamp.precision.modes import get_mode
    from vlamp.sim.tasks import DEFAULT_SUITE, TASKS
    from vlamp.train import fit
    from vlamp.train.budget import budget_bytes, fit_run, largest
    from vlamp.train.config_io import load_config

    config = load_config(args.config, list(args.overrides) + list(getattr(args, "extra", [])))
    if args.rows < 1:
        raise VlampError(f"--rows must be >= 1, got {args.rows}")
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    for m in modes or []:
        get_mode(m)  # an unknown name: one line with the legal ones
    states = [x.strip() for x in args.states.split(",")]
    if not states or any(x not in fit.STATES for x in states):
        raise VlampError(f"--states {args.states!r}: give one or more of {', '.join(fit.STATES)}")
    m = config.model  # the default suite's shapes where the dataset would set them
    if not m.vocab_size:
        m.vocab_size = len(WordTokenizer.build((TASKS[t].instruction for t in DEFAULT_SUITE),
                                               m.max_tokens))
    device = resolve_device(config.train.device)
    budget = budget_bytes(args.budget or config.train.memory_budget or "auto", device)
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    if args.largest:
        found = largest(config, args.largest, device, budget, modes, log, states=states)
        if found is None:
            print(f"nothing fits {fit.gib(budget)} GiB even at {args.largest}=1")
            return 1
        n, result = found
        print(f"largest {args.largest}={n}: {result.chosen.candidate.label()}, predicted peak "
              f"{fit.gib(result.chosen.peak)} GiB of {fit.gib(budget)}")
        config.model = dataclasses.replace(config.model, **{args.largest.removeprefix("model."): n})
        m = config.model
    else:
        result = fit_run(config, device, budget, modes, log, states=states)
    if args.json:
        print(json.dumps({"budget_bytes": budget, "chosen": _row(result.chosen),
                          "predictions": [_row(p) for p in result.predictions]}, indent=1))
        return 0
    for note in result.notes:
        print(note, file=sys.stderr)
    print(fit.table(result.predictions, budget, result.chosen, args.rows))
    print(result.reason())
    if any(p.fits_if_cached(budget) for p in result.predictions):  # the trainer reads the plan then
        print("(rows over the budget only at their plan's measurement fit with the plan in the "
              "cache: a run of the same config on this machine caches it)")
    if result.chosen is not None:
        chosen = result.chosen.candidate.overrides(fit.blocks_of(m))
        if args.largest:
            chosen.append(f"{args.largest}={getattr(m, args.largest.removeprefix('model.'))}")
        keys = {c.split("=", 1)[0] for c in chosen}  # the choice replaces what it sets
        given = [o for o in [*args.overrides, *getattr(args, "extra", [])]
                 if o.lstrip("-").split("=", 1)[0] not in keys]
        print(f"train it: vlamp train {' '.join([*given, *chosen])}")
    return 0 if result.chosen is not None else 1


def _row(p) -> dict | None:
    if p is None:
        return None
    return {"configuration": p.candidate.label(), **p.by_kind, "peak_bytes": p.peak, "at": p.moment,
            "fits": p.fits, "step_s": None if math.isnan(p.step_s) else p.step_s,
            "peak_if_plan_cached_bytes": p.if_cached.peak if p.if_cached is not None else None}
