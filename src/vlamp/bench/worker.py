"""One benchmark run, in its own process so its peak memory is its own.

``python -m vlamp.bench.worker SPEC.json RESULT.json``: SPEC holds ``config`` (a run config as a
dict), ``runner`` (``"vlamp"``, or ``"torch.amp"`` for the hand-written baseline loop), ``warmup``
(steps left out of the step-time median), ``eval_episodes``, ``threads`` (a count, or ``"auto"``:
the faster of 1 and all, measured) and ``round_steps``.

The run takes turns with the others (see :mod:`vlamp.bench.run`): it talks JSON lines on its
standard output and reads commands on its standard input::

    -> {"event": "loaded"}                 <- probe       (every run loads, then probes alone)
    -> {"event": "ready", "threads": N}    <- go
    -> {"event": "paused", "step": k}      <- go          (every round_steps steps)
    -> {"event": "trained", "step": n}     <- finish      (then validation, evaluation, result)

so no two runs are timed at once, and nothing else of the benchmark runs while one is.
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


def _trim_heap() -> None:
    """Hands the heap's free memory back to the system (glibc ``malloc_trim``), so the RSS read
    next is what the process holds, not what earlier work (the plan's measurement, the thread
    probe) freed but the allocator kept. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


class _Channel:
    """The worker's end of the protocol. Prints of the run itself go to stderr, so they cannot
    mix with the protocol's lines."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **event: Any) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def wait(self, command: str) -> None:
        line = sys.stdin.readline().strip()
        if line != command:
            sys.exit(f"bench worker: expected {command!r} from the coordinator, got {line!r}")

    def pauser(self, round_steps: int, total: int):
        """``on_step`` for the training loop: pause after every round and after the last step."""
        def on_step(step: int) -> None:
            if step >= total:
                self.send(event="trained", step=step)
                self.wait("finish")
            elif step % round_steps == 0:
                self.send(event="paused", step=step)
                self.wait("go")
        return on_step


def choose_threads(trainer, autocast, repeats: int = 3) -> tuple[int, dict[str, float]]:
    """Times the model's forward+backward at 1 thread and at all of them; returns the faster count
    and the median times (ms). The model's weights, gradients and the RNG are left as they were."""
    cores = torch.get_num_threads()
    b = trainer.example_batch()
    rng = torch.get_rng_state()
    times: dict[str, float] = {}
    for n in dict.fromkeys((1, cores)):
        torch.set_num_threads(n)
        samples = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast():
                loss = trainer.model(b)
            loss.backward()
            samples.append(time.perf_counter() - t0)
            trainer.model.zero_grad(set_to_none=True)
        times[str(n)] = 1e3 * statistics.median(samples[1:])
    torch.set_rng_state(rng)
    best = int(min(times, key=times.get))
    torch.set_num_threads(best)
    return best, times


def baseline_fit(trainer, dtype: torch.dtype, steps: int, on_step=None
                 ) -> tuple[list[float], list[float], list[float], int]:
    """The plain torch.amp loop a user would write by hand (autocast, GradScaler for FP16, clip,
    step), on the trainer's model, optimizer and batches. Returns losses, scales, step times and
    skipped steps; ``on_step(step)`` is called after each step."""
    from vlamp.precision.hardware import synchronize
    from vlamp.train.step import learning_rate

    c = trainer.config.train
    model, opt, device = trainer.model, trainer.optimizer, trainer.device
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    losses, scales, times, skipped, applied = [], [], [], 0, 0
    for _ in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(applied, c.lr, c.warmup_steps, c.steps, c.min_lr_ratio)
        positions = trainer.rng.integers(0, len(trainer.train_set), size=c.batch_size)
        batch = trainer._batch(positions, trainer.config.dataset.augment)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
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
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        scales.append(scale)
        skipped += int(skip)
        applied += int(not skip)
        if on_step is not None:
            on_step(len(times))
    return losses, scales, times, skipped


def run(spec: dict[str, Any], channel: _Channel | None = None) -> dict[str, Any]:
    from vlamp.precision.dtypes import to_dtype
    from vlamp.precision.memory import state_memory
    from vlamp.precision.weight_update import mode_label
    from vlamp.train.config_io import decode
    from vlamp.train.trainer import Trainer

    config = decode(spec["config"])
    runner = spec.get("runner", "vlamp")
    mode = config.precision.mode
    if runner == "torch.amp":
        config.precision.mode = "fp32"  # the model stays plain; the loop below brings autocast
    config.eval.final = False
    config.train.val_every = 0
    round_steps = max(1, int(spec.get("round_steps") or config.train.steps))
    _checkpoint_rounds(config, runner, round_steps)
    threads = spec.get("threads") or "auto"
    if threads != "auto":
        torch.set_num_threads(int(threads))
    trainer = Trainer(config, progress=spec.get("progress", True))
    device = trainer.device
    low = to_dtype(mode.split("-")[0]) if mode != "fp32" else torch.float32
    amp = _AmpAutocast(low, device.type)
    autocast = amp.autocast if runner == "torch.amp" else trainer.mp.autocast
    threads, thread_times = _threads(threads, trainer, autocast, channel)
    steps, resumed = config.train.steps, trainer.step
    on_step = _first_turn(channel, int(threads), resumed, round_steps, steps)
    _trim_heap()
    rss_before = _rss_now()  # data, model, optimizer: what a run holds before its first step
    reset = _reset_peak_rss()
    gpu_before = _reset_gpu_peak(device)
    if runner == "torch.amp":
        losses, scales, times, skipped = baseline_fit(trainer, low, steps, on_step)
        trainer.step = steps
        val = _validate_amp(trainer, amp)  # as the vlamp runs' fit ends with validation
        peak, gpu_peak = _peak_rss(), _gpu_peak(device)
    else:
        losses, scales, times, skipped, val = _fit(trainer, on_step)
        peak, gpu_peak = _peak_rss(), _gpu_peak(device)
    memory = state_memory(trainer.model, trainer.optimizer, trainer.mp if runner == "vlamp" else None)
    probe = _probe_step(trainer, autocast)
    timed = times[spec.get("warmup", 5):] or times
    median = statistics.median(timed)
    samples = trainer.effective_batch  # all ranks' samples per step
    success, per_task, outcomes = _success(trainer, spec.get("eval_episodes", 0),
                                           amp if runner == "torch.amp" else None)
    plan = getattr(trainer.mp, "plan", None)
    return {
        "mode": spec.get("label") or mode_label(mode, config.precision.update,
                                               config.precision.optimizer_state),
        "runner": runner,
        "steps": len(losses),
        "resumed_at_step": resumed,  # > 0: trained on from an interrupted benchmark's checkpoint
        "precision": trainer.mp.mode.name if runner == "vlamp" else mode,
        "precision_reason": (plan.measured or {}).get("reason") if plan is not None else None,
        **_rule_counts(plan),
        "threads": int(threads), "threads_probe_ms": thread_times,
        "step_time_s_median": median, "step_time_s_p90": float(np.percentile(timed, 90)),
        "step_times": times, "samples_per_s": samples / median, "casts_per_step": probe["ops"]["casts"],
        "compute_ops_per_step": probe["ops"]["compute"],
        "peak_rss_bytes": peak, "rss_before_training_bytes": rss_before,
        "training_rss_bytes": peak - rss_before if reset else None,  # what training itself added
        "peak_rss_is_training_only": reset, **memory,
        "activations_bytes": probe["activations"], "activations_by_module": probe["by_module"],
        "activations_by_dtype": probe["by_dtype"], "data_bytes": trainer.data.memory_bytes,
        "data_streamed": not isinstance(trainer.data.images, np.ndarray),
        "step_peak_bytes": probe["live"].get("peak_bytes"),
        "step_added_bytes": probe["live"].get("added_bytes"),
        "step_peak_by_kind": probe["live"].get("peak_by_kind"),
        "device": str(device), "tf32": config.precision.tf32 if device.type == "cuda" else None,
        "gpu_peak_bytes": gpu_peak,  # torch.cuda.max_memory_allocated over training
        "gpu_training_bytes": gpu_peak - gpu_before if gpu_peak is not None else None,
        "final_val_action_l1": val, "success_rate": success, "success_per_task": per_task,
        "success_outcomes": outcomes,  # per task, episode by episode (the same seeds in every run)
        "skipped_steps": skipped, "losses": losses, "loss_scales": scales,
        "batch_size": config.train.batch_size, "ranks": trainer.world.size,
        "strategy": config.distributed.strategy if trainer.world.distributed else None,
        "samples_per_s_per_rank": samples / median / trainer.world.size,
    }


def _first_turn(channel: _Channel | None, threads: int, resumed: int, round_steps: int,
                steps: int):
    """Says the run is ready (from step ``resumed``: > 0 when resumed), waits for its first turn;
    returns the training loop's ``on_step`` (``None`` without a coordinator)."""
    if channel is None:
        return None
    channel.send(event="ready", threads=threads, step=resumed)
    channel.wait("go")
    on_step = channel.pauser(round_steps, steps)
    if resumed >= steps:  # stopped after its last step: nothing left to train
        on_step(steps)
    return on_step


def _fit(trainer, on_step) -> tuple[list[float], list[float], list[float], int, float | None]:
    """``trainer.fit``: losses, scales and step times of every step (those an interrupted process
    trained before the checkpoint it resumed from read back), skipped steps, validation error."""
    resumed = trainer.step
    earlier = _earlier_steps(trainer.run_dir, resumed)
    r = trainer.fit(on_step)
    val = r.val_action_l1
    if resumed >= trainer.config.train.steps and trainer.val_set is not None:
        val = trainer.validate()  # it validated before it was stopped; fit had nothing to do
    return (earlier[0] + r.losses, earlier[1] + r.scales, earlier[2] + r.step_times,
            r.skipped_steps, val)


def _checkpoint_rounds(config, runner: str, round_steps: int) -> None:
    """A vlamp run checkpoints at the end of every round, when it pauses, logging every step, so
    that an interrupted benchmark resumes it there (``vlamp bench --resume``): its directory holds a
    checkpoint -> ``resume``; anything else there (a run killed before its first round ended, the
    torch.amp loop, which keeps no checkpoint) is cleared and the run starts over."""
    import shutil

    from vlamp.train.checkpoint import list_checkpoints

    run_dir = Path(config.output_dir)
    config.resume = runner == "vlamp" and bool(list_checkpoints(run_dir))
    if not config.resume and int(os.environ.get("RANK", "0")) == 0:  # torchrun ranks share it
        shutil.rmtree(run_dir, ignore_errors=True)
    if runner == "vlamp":
        config.train.save_every, config.train.keep_last, config.train.log_every = round_steps, 1, 1
    else:
        config.train.save_every = 0


def _earlier_steps(run_dir: Path, resumed: int) -> tuple[list[float], list[float], list[float]]:
    """The losses, loss scales and step times of steps 1..``resumed``, which an interrupted process
    trained: read from the run's per-step log. Rows a killed process wrote after its last
    checkpoint are left out (the resuming trainer cuts them from the log on rank 0 only)."""
    if resumed == 0:
        return [], [], []
    rows: dict[int, dict[str, Any]] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("kind") == "train" and row["step"] <= resumed:
                rows[row["step"]] = row
    if sorted(rows) != list(range(1, resumed + 1)):
        raise RuntimeError(f"bench worker: {run_dir} logs {len(rows)} of the {resumed} steps its "
                           f"checkpoint holds; delete that directory to run it again")
    ordered = [rows[k] for k in range(1, resumed + 1)]
    return ([r["loss"] for r in ordered], [r["loss_scale"] for r in ordered],
            [r["step_time_s"] for r in ordered])


def _rule_counts(plan) -> dict[str, int]:
    """What the measured plan decided: modules kept in FP32 for speed, islands handing on low
    precision (:mod:`vlamp.precision.lean`)."""
    from vlamp.precision.lean import LEAN

    rules = plan.user_rules if plan is not None else ()
    return {"fp32_rules": sum(1 for r in rules if r.label.startswith("measured:")),
            "lean_islands": sum(1 for r in rules if LEAN in r.label)}


class _AmpAutocast:
    """Stands in for ``MixedPrecision`` where the baseline's forward passes need only autocast."""

    def __init__(self, dtype: torch.dtype, device_type: str) -> None:
        self.dtype, self.device_type = dtype, device_type

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def _threads(threads: str | int, trainer, autocast, channel: _Channel | None = None
             ) -> tuple[int, Any]:
    """The thread count asked for, or (``"auto"``) the fastest of a short probe on a CPU; on a
    GPU the CPU threads only feed it, and torch's default stands. With a coordinator, first says
    the run is loaded and waits for its turn (the runs load side by side, then probe alone)."""
    if channel is not None:
        channel.send(event="loaded")
        channel.wait("probe")
    if threads != "auto":
        return int(threads), None
    if trainer.device.type == "cuda":
        return torch.get_num_threads(), None
    return choose_threads(trainer, autocast)


def _probe_step(trainer, autocast) -> dict[str, Any]:
    """One more forward+backward on a training batch, instrumented: what its forward saves for
    the backward (by module and dtype), the kernels and casts it runs (counted at the aten level),
    and the live tensors over it."""
    from vlamp.precision.memory import ActivationMeter, step_memory
    from vlamp.precision.verify import count_ops

    b = trainer.example_batch()
    # Ranks run it together (their wrapper's collectives must match); one process, eagerly.
    counted = trainer.forward if trainer.world.distributed else trainer.model
    with ActivationMeter(trainer.model) as meter:  # what one step's forward saves for its backward
        with autocast():
            loss = counted(b)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    top: dict[str, int] = {}
    for name, n in meter.by_module.items():
        top[name.split(".")[0]] = top.get(name.split(".")[0], 0) + n

    def one_step() -> None:
        with autocast():
            loss = counted(b)
        loss.backward()

    ops = count_ops(one_step)  # proof of what a step computes in, counted at the aten level
    trainer.model.zero_grad(set_to_none=True)
    device = trainer.device
    where = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    live = step_memory(one_step, where) or {}  # live tensors over a forward+backward
    trainer.model.zero_grad(set_to_none=True)
    return {"activations": meter.total, "by_module": top, "by_dtype": meter.by_dtype, "ops": ops,
            "live": live}


def _success(trainer, episodes: int, amp: _AmpAutocast | None
             ) -> tuple[float | None, dict | None, dict | None]:
    """Closed-loop success (mean, per task, episode outcomes per task) over ``episodes`` per task;
    ``amp``: the baseline's forward passes run under its autocast."""
    if episodes <= 0:
        return None, None, None
    trainer.config.eval.episodes = episodes
    if amp is not None:
        trainer.mp = amp  # the evaluated forward passes use the same autocast
    e = trainer.evaluate()
    return (e["success_rate"], {t["task"]: t["success_rate"] for t in e["per_task"]},
            {t["task"]: t["outcomes"] for t in e["per_task"]})


def _validate_amp(trainer, amp: _AmpAutocast) -> float | None:
    if trainer.val_set is None:
        return None
    trainer.mp = amp
    return trainer.validate()


def _reset_gpu_peak(device: torch.device) -> int | None:
    """Resets the CUDA allocator's peak mark; returns the bytes allocated now (model, optimizer)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _gpu_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main(argv: list[str]) -> int:
    from vlamp.io import write_json

    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun rank other than 0: train, say nothing
        os.dup2(2, 1)
        run(spec, None)
        _close_distributed()
        return 0
    channel = _Channel()
    result = run(spec, channel)
    write_json(result, out_path, compact=True)
    channel.send(event="done")
    _close_distributed()
    return 0


def _close_distributed() -> None:
    from vlamp.train import distributed

    distributed.close()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C reaches every run; the coordinator says what to do next
        sys.exit(130)
