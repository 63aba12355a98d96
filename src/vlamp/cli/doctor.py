"""``vlamp doctor``: the hardware, the number formats, measured throughput and the auto mode."""

from __future__ import annotations

import argparse
import json

from vlamp.precision import (
    FORMATS,
    choose_mode,
    detect,
    format_table,
    measure_throughput,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="hardware, formats, measured throughput, auto mode",
                       description="Show this machine's hardware, the number-format table, a short "
                                   "measured fp32/bf16/fp16 GEMM, conv and attention (forward and "
                                   "backward) micro-benchmark, and the "
                                   "precision mode 'auto' picks here, with the reason.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--device", default=None, help="device to examine (default: cuda if present, else cpu)")
    p.add_argument("--budget", type=float, default=0.15,
                   help="seconds spent timing each micro-benchmark (default: 0.15)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    hw = detect(args.device)
    choice = choose_mode(hw)
    throughput = measure_throughput(hw.device, budget_s=args.budget)
    if args.json:
        print(json.dumps({
            "hardware": hw.as_dict(),
            "formats": {name: f.as_dict() for name, f in FORMATS.items()},
            "auto_mode": choice.mode,
            "tf32": "off unless precision.tf32=true" if hw.device == "cuda" else None,
            "reason": choice.reason,
            "throughput": {kind: {k: round(v, 2) for k, v in d.items()} for kind, d in throughput.items()},
        }, indent=2))
        return 0
    print(f"device     {hw.device}: {hw.name}")
    if hw.cuda_capability:
        print(f"capability {hw.cuda_capability[0]}.{hw.cuda_capability[1]}")
    print(f"cpu flags  {' '.join(hw.cpu_flags) or '(none of interest)'}")
    if hw.device == "cuda":
        print("tf32       off in vlamp unless precision.tf32=true (then FP32 matmuls and "
              "convolutions, FP32 islands included, run on TF32 tensor cores); the tf32 column "
              "below is what it buys")
    print(f"torch      {hw.torch_version}\n")
    print(format_table() + "\n")
    print("measured throughput, GFLOP/s (ratio to fp32)")
    for kind, d in throughput.items():
        cells = "  ".join(f"{k} {v:8.1f} ({v / d['fp32']:.2f}x)" for k, v in d.items())
        print(f"  {kind:<9} {cells}")
    print(f"\nauto mode  {choice.mode}: {choice.reason}")
    if choice.mode != "fp32":
        print(f"           proposed by the hardware; `vlamp plan --auto` measures it on the model "
              f"(per module and per step) and keeps fp32 wherever {choice.mode} is slower")
    return 0
