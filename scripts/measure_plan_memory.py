"""What measuring a plan holds: the peak resident memory of ``measure_plan`` above the model it
measures, in a fresh process, beside the model's FP32 weights.

The model is built from ``vlamp train``'s config keys (random init, nothing downloaded); with
``train.lora.*`` its adapted layers are frozen and passed to the measurement as the trainer
passes them. Nothing is cached (``cache=False``), so every run measures.

    python scripts/measure_plan_memory.py bf16-mixed model.name=hf-vlm model.dim=1024 \\
        model.heads=8 model.text_layers=2 model.depth=8 train.batch_size=4 \\
        [train.lora.rank=16 'train.lora.targets=[Linear]'] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from vlamp.models.lora import adapt
from vlamp.models.registry import build_model
from vlamp.precision.autoplan import measure_plan
from vlamp.precision.memory import PeakRSS
from vlamp.train.config_io import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", help="the precision mode measured (bf16-mixed, bf16-true, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="vlamp train's config keys")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per module")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None, args.overrides)
    config.model.vocab_size = config.model.vocab_size or 64
    torch.manual_seed(0)
    model = build_model(config.model)
    bases = adapt(model, config.train.lora)
    batch = model.example_batch(config.train.batch_size)
    n = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    peak = PeakRSS()
    start = time.perf_counter()
    plan = measure_plan(model, batch, args.mode, cache=False, repeats=args.repeats,
                        freeze=[*config.train.freeze, *bases])
    held = peak.read()
    print(f"{args.mode}: {n / 1e6:.1f} M parameters ({trained / 1e6:.1f} M trained), FP32 weights "
          f"{4 * n / 2**30:.3f} GiB; measure_plan held {held / 2**30:.3f} GiB above the model "
          f"({held / (4 * n):.2f}x its FP32 weights) for {time.perf_counter() - start:.0f} s, "
          f"{torch.get_num_threads()} threads")
    print(f"  {plan.measured.get('reason')}")


if __name__ == "__main__":
    main()
