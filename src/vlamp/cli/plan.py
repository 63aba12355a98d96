"""``vlamp plan``: the resolved precision plan of a model, as the describe table."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from vlamp.precision import MODE_NAMES, PrecisionPlan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show which precision every module runs in",
                       description="Resolve a precision plan (a mode plus rules) over TinyVLA, the default model, and "
                                   "print, per module: parameter storage, compute, output, gradient "
                                   "and optimizer-state dtype, parameter count and the deciding rule.")
    p.add_argument("--mode", default="bf16-mixed", help=f"one of {', '.join(MODE_NAMES)}, auto "
                                                         "(default: bf16-mixed)")
    p.add_argument("--rules", default=None, metavar="FILE",
                   help="YAML rules file: {builtin_rules: bool, rules: [{pattern, policy}]}")
    p.add_argument("--no-builtin-rules", action="store_true",
                   help="drop the built-in FP32 islands (norms, embeddings, action output, loss)")
    p.add_argument("--head", default="act", choices=("act", "flow"),
                   help="TinyVLA's action head (default: act)")
    p.add_argument("--depth", type=int, default=None, help="fold modules deeper than this")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlamp.models.tinyvla import ModelConfig, TinyVLA
    from vlamp.models.tokenizer import WordTokenizer
    from vlamp.sim.tasks import DEFAULT_SUITE, TASKS

    vocab = len(WordTokenizer.build(TASKS[t].instruction for t in DEFAULT_SUITE))
    model = TinyVLA(ModelConfig(vocab_size=vocab, head=args.head))
    if args.rules:
        plan = PrecisionPlan.load(args.rules, mode=args.mode)
        if args.no_builtin_rules:
            plan.builtin_rules = False
    else:
        plan = PrecisionPlan(args.mode, builtin_rules=not args.no_builtin_rules)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan.resolve(model)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    table = plan.describe(model, max_depth=args.depth)
    print(json.dumps(table.to_dicts(), indent=2) if args.json else table)
    return 0
