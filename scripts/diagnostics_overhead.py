"""What precision.diagnostics costs a training step, measured side by side.

Two trainers of the default config (the same seed, plan and data) take turns, ROUND steps at a
time, one with diagnostics off and one sampling every N-th step; each step is timed with
`train_step` as the trainer runs it. Prints the median and the mean step time of each (the median
hides the sampled steps; the mean carries their cost), over the steps after a warm-up.

    python scripts/diagnostics_overhead.py [--mode bf16-mixed] [--every 50] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from vlamp.precision.hardware import synchronize
from vlamp.train import distributed
from vlamp.train.config_io import load_config
from vlamp.train.step import train_step
from vlamp.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="bf16-mixed")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--round", type=int, default=25)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    trainers, times = {}, {}
    for name in ("off", f"every:{args.every}"):
        cfg = load_config(None, [f"precision.mode={args.mode}", f"precision.diagnostics={name}",
                                 f"output_dir=/tmp/vlamp-diag-overhead-{name.replace(':', '')}",
                                 "eval.final=false"])
        trainers[name] = Trainer(cfg, progress=False)
        times[name] = []
    step = 0
    while step < args.steps:
        for name, t in trainers.items():
            c = t.config
            for k in range(args.round):
                positions = t.rng.integers(0, len(t.train_set), size=t.effective_batch)
                batches = [t._batch(chunk, c.dataset.augment)
                           for chunk in distributed.my_share(positions, c.train.grad_accum, t.world)]
                t0 = time.perf_counter()
                train_step(t.forward, batches, t.mp, t.optimizer, c.train.clip_grad_norm or None)
                synchronize(t.device)
                times[name].append(time.perf_counter() - t0)
        step += args.round
    print(f"{args.mode}, {torch.get_num_threads()} threads, {args.steps} steps each, turns of "
          f"{args.round}; after {args.warmup} warm-up steps:")
    base = None
    for name, ts in times.items():
        ts = ts[args.warmup:]
        med, mean = statistics.median(ts), float(np.mean(ts))
        base = base or (med, mean)
        print(f"  diagnostics {name:9s} median {med * 1e3:7.1f} ms ({med / base[0] - 1:+.1%})  "
              f"mean {mean * 1e3:7.1f} ms ({mean / base[1] - 1:+.1%})")
    sampled = [t for i, t in enumerate(times[f"every:{args.every}"]) if (i + 1) % args.every == 0 or i == 0]
    print(f"  a sampled step: median {statistics.median(sampled) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
