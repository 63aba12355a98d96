"""``vlamp diagnose RUN``: where a run's low precision overflowed, underflowed or lost updates."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose", help="report a run's numerical health per module (precision.diagnostics)",
        description="Read the per-module records a run wrote with precision.diagnostics=every:N "
                    "(overflow, underflow and headroom of activations and gradients in each module's "
                    "compute dtype, updates lost to rounding) and write a report: the modules most "
                    "at risk first, each with what to do, and module x step heatmaps. Writes "
                    "DIR/report.md, DIR/report.html and the plots.",
        epilog="examples:\n  vlamp train precision.mode=fp16-mixed precision.diagnostics=every:50 "
               "output_dir=runs/fp16\n  vlamp diagnose runs/fp16\n"
               "  vlamp diagnose runs/fp16 --out runs/fp16/diagnose --top 30",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="a run directory (a `vlamp train` output_dir)")
    p.add_argument("--out", default=None, metavar="DIR", help="default: RUN/diagnose")
    p.add_argument("--top", type=int, default=15, help="modules listed (default: 15)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlamp.precision.errors import VlampError
    from vlamp.train.diagnose import read, risks, write_report

    if args.top < 1:
        raise VlampError(f"--top must be >= 1, got {args.top}")
    d = read(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "diagnose"
    md, page = write_report(d, out, top=args.top)
    found = risks(d)
    print(f"{len(d.steps)} sampled steps, {len(d.modules)} modules; "
          f"{len(found)} with findings" + (":" if found else "."))
    for r in found[:args.top]:
        print(f"  {r.module} ({r.dtype}): {'; '.join(r.findings)} -> {'; '.join(r.advice)}")
    print(f"report: {md}, {page}")
    return 0
