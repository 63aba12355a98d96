"""One benchmark run, in its own process so its peak memory is its own.

``python -m vlamp.bench.worker SPEC.json RESULT.json``: SPEC holds ``config`` (a run config as a
dict), ``runner`` (``"vlamp"``, or ``"torch.amp"`` for the hand-written baseline loop), ``warmup``
(steps left out of the step-time median) and ``eval_episodes``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUNNERS = ("vlamp", "torch.amp")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM), so the peak measured next is training's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held by the model's parameters, FP32 master copies, gradients and optimizer state."""
    model_ids = {id(p) for p in model.parameters()}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    masters = sum(p.numel() * p.element_size() for p in opt_params if id(p) not in model_ids)
    grads = sum(p.numel() * p.element_size() for p in opt_params if p.requires_grad)
    optim = sum(t.numel() * t.element_size() for st in optimizer.state.values()
                for t in st.values() if isinstance(t, torch.Tensor))
    return {"params_bytes": params + masters, "grads_bytes": grads, "optimizer_bytes": optim,
            "state_bytes": params + masters + grads + optim}


def baseline_fit(trainer, dtype: torch.dtype, steps: int) -> tuple[list[float], list[float], list[float], int]:
    """The plain torch.amp loop a user would write by hand (autocast, GradScaler for FP16, clip,
    step), on the trainer's model, optimizer and batches. Returns losses, scales, step times and
    skipped steps."""
    from vlamp.train.step import learning_rate

    c = trainer.config.train
    model, opt = trainer.model, trainer.optimizer
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    losses, scales, times, skipped, applied = [], [], [], 0, 0
    for _ in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(applied, c.lr, c.warmup_steps, c.steps, c.min_lr_ratio)
        positions = trainer.rng.integers(0, len(trainer.train_set), size=c.batch_size)
        batch = trainer._batch(positions, trainer.config.dataset.augment)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype):
            loss = model(batch)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad_norm or float("inf"))
        before = scaler.get_scale() if scaler.is_enabled() else None
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
            skip = scaler.get_scale() < before
        else:
            skip = not torch.isfinite(norm)
            if not skip:
                opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        scales.append(scale)
        skipped += int(skip)
        applied += int(not skip)
    return losses, scales, times, skipped


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vlamp.precision.dtypes import to_dtype
    from vlamp.train.config import decode
    from vlamp.train.trainer import Trainer

    config = decode(spec["config"])
    runner = spec.get("runner", "vlamp")
    mode = config.precision.mode
    if runner == "torch.amp":
        config.precision.mode = "fp32"  # the model stays plain; the loop below brings autocast
    config.eval.final = False
    config.train.save_every = 0
    config.train.val_every = 0
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    trainer = Trainer(config, progress=spec.get("progress", True))
    rss_before = _rss_now()
    reset = _reset_peak_rss()
    if runner == "torch.amp":
        low = to_dtype(mode.split("-")[0]) if mode != "fp32" else torch.float32
        losses, scales, times, skipped = baseline_fit(trainer, low, config.train.steps)
        trainer.step = config.train.steps
        val = _validate_amp(trainer, low)
    else:
        r = trainer.fit()
        losses, scales, times, skipped, val = r.losses, r.scales, r.step_times, r.skipped_steps, r.val_action_l1
    peak = _peak_rss()
    memory = state_bytes(trainer.model, trainer.optimizer)
    timed = times[spec.get("warmup", 5):] or times
    median = statistics.median(timed)
    samples = config.train.batch_size * config.train.grad_accum
    success, per_task = None, None
    if spec.get("eval_episodes", 0) > 0:
        config.eval.episodes = spec["eval_episodes"]
        if runner == "torch.amp":
            trainer.mp = _AmpAutocast(low)  # the evaluated forward passes use the same autocast
        e = trainer.evaluate()
        success, per_task = e["success_rate"], {t["task"]: t["success_rate"] for t in e["per_task"]}
    return {
        "mode": mode, "runner": runner, "steps": len(losses),
        "step_time_s_median": median, "step_time_s_p90": float(np.percentile(timed, 90)),
        "samples_per_s": samples / median,
        "peak_rss_bytes": peak, "rss_before_training_bytes": rss_before,
        "training_rss_bytes": peak - rss_before if reset else None,  # what training itself added
        "peak_rss_is_training_only": reset, **memory,
        "final_val_action_l1": val, "success_rate": success, "success_per_task": per_task,
        "skipped_steps": skipped, "losses": losses, "loss_scales": scales,
        "batch_size": config.train.batch_size,
    }


class _AmpAutocast:
    """Stands in for ``MixedPrecision`` where the baseline's forward passes need only autocast."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32)


def _validate_amp(trainer, dtype: torch.dtype) -> float | None:
    if trainer.val_set is None:
        return None
    trainer.mp = _AmpAutocast(dtype)
    return trainer.validate()


def main(argv: list[str]) -> int:
    from vlamp.io import write_text_atomic

    spec_path, out_path = argv
    result = run(json.loads(Path(spec_path).read_text()))
    write_text_atomic(out_path, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
