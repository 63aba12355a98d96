"""What measuring a plan holds: the peak resident memory of ``measure_plan`` above the model it
measures, in a fresh process, beside the model's FP32 weights.

The model is built from ``vlamp train``'s config keys (random init, nothing downloaded); with
``train.lora.*`` its adapted layers are frozen and passed to the measurement as the trainer
passes them. Nothing is cached (``cache=False``), so every run measures. ``--phases`` also
samples the resident memory every 20 ms beside the innermost vlamp frames running, and prints the
highest sample of each (where the peak is: the copy, the capture, the FP32 step, ...); run it with
``MALLOC_MMAP_THRESHOLD_=65536`` to see the tensors without what glibc's heap keeps of freed blocks.

    python scripts/measure_plan_memory.py bf16-mixed model.name=hf-vlm model.dim=1024 \\
        model.heads=8 model.text_layers=2 model.depth=8 train.batch_size=4 \\
        [train.lora.rank=16 'train.lora.targets=[Linear]'] [--repeats 3] [--threads 2] [--phases]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import sys
import threading
import time

import torch

from vlamp.models.lora import adapt
from vlamp.models.registry import build_model
from vlamp.precision.autoplan import measure_plan
from vlamp.precision.memory import PeakRSS, _status_bytes
from vlamp.train.config_io import load_config


class Phases:
    """Samples this process's resident memory every 20 ms with the innermost three vlamp frames of
    the main thread; keeps each frame stack's highest sample."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = collections.defaultdict(int)
        self.main, self.done = threading.get_ident(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "Phases":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            frame, names = sys._current_frames().get(self.main), []
            while frame is not None and len(names) < 3:
                if "vlamp" in frame.f_code.co_filename:
                    names.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")
                frame = frame.f_back
            key = " < ".join(names) or "(outside vlamp)"
            self.peaks[key] = max(self.peaks[key], _status_bytes("VmRSS"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", help="the precision mode measured (bf16-mixed, bf16-true, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="vlamp train's config keys")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per module")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phases", action="store_true",
                   help="also print the highest resident memory sampled in each phase (top 15)")
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
    with Phases() if args.phases else contextlib.nullcontext() as phases:
        plan = measure_plan(model, batch, args.mode, cache=False, repeats=args.repeats,
                            freeze=[*config.train.freeze, *bases])
    held = peak.read()
    print(f"{args.mode}: {n / 1e6:.1f} M parameters ({trained / 1e6:.1f} M trained), FP32 weights "
          f"{4 * n / 2**30:.3f} GiB; measure_plan held {held / 2**30:.3f} GiB above the model "
          f"({held / (4 * n):.2f}x its FP32 weights) for {time.perf_counter() - start:.0f} s, "
          f"{torch.get_num_threads()} threads")
    print(f"  {plan.measured.get('reason')}")
    if phases is not None:
        for where, rss in sorted(phases.peaks.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {(rss - peak.baseline) / 2**20:8.0f} MiB above the model  {where}")


if __name__ == "__main__":
    main()
