"""What the machine is, and what else it was doing while a benchmark run was timed.

Timing on a shared machine lies quietly: with another process busy on the other core, multi-threaded
bf16 steps measured 100x slower than on a quiet machine. So the bench reads the kernel's CPU
counters (``/proc/stat``, ``/proc/PID/stat``) around every round of every run: CPU time spent by
anything but the run itself (other processes), time the hypervisor took (steal), and the load
average; :func:`assess` turns those and the spread of step times into warnings.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from typing import Any

import numpy as np
import torch

from vlamp.precision.hardware import choose_mode, detect, native_formats

# Thresholds of :func:`assess`: above them a run's timings are not to be trusted.
OTHER_CORES_LIMIT = 0.3   # mean cores busy with other work while the run was timed
STEAL_LIMIT = 0.05        # fraction of CPU time the hypervisor took
SPREAD_LIMIT = 1.5        # p90 step time / median step time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_info(device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The machine the runs used: CPU (model, flags, cores), torch, the mode ``auto`` proposes
    for ``device``, and the GPU (name, capability, driver, CUDA) only when ``device`` is one."""
    hw = detect(device)
    gpu = hw.device == "cuda"
    return {"device": str(device), "cpu": detect("cpu").name, "cpu_flags": list(hw.cpu_flags),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": hw.name if gpu else None,
            "cuda_capability": list(hw.cuda_capability) if hw.cuda_capability else None,
            "cuda": torch.version.cuda if gpu else None, "gpu_driver": _driver() if gpu else None,
            "torch": str(torch.__version__), "python": platform.python_version(),
            "auto_mode": choose_mode(hw).mode, "native_low_precision": list(native_formats(hw))}


def _driver() -> str | None:
    """The NVIDIA driver's version, from ``nvidia-smi`` (torch does not report it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """The kernel's cumulative counters at one moment (clock ticks), and the 1-minute load."""

    wall: float
    busy: int       # user + nice + system + irq + softirq, all CPUs
    steal: int
    total: int
    process: int    # user + system of the timed process (all its threads)
    loadavg: float

    @classmethod
    def read(cls, pid: int) -> CpuSample:
        busy = steal = total = process = 0
        load = float("nan")
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            user, nice, system, idle, iowait, irq, softirq, st = (fields + [0] * 8)[:8]
            busy, steal, total = user + nice + system + irq + softirq, st, sum(fields[:8])
            process = sum(_cpu_ticks(p) for p in _tree(pid))  # a torchrun launcher: its ranks too
            with open("/proc/loadavg") as f:
                load = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # not Linux: no counters, so nothing will be flagged from them
        return cls(time.perf_counter(), busy, steal, total, process, load)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # fields after the command name


def _cpu_ticks(pid: int) -> int:
    try:
        fields = _stat(pid)
    except OSError:
        return 0  # exited meanwhile
    return int(fields[11]) + int(fields[12])  # utime, stime


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a torchrun launcher's ranks)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def round_load(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """What happened on the machine between two samples around one timed round."""
    wall = max(after.wall - before.wall, 1e-9)
    other = max(0, (after.busy - before.busy) - (after.process - before.process))
    total = max(after.total - before.total, 1)
    return {"wall_s": wall, "other_cores": other / _TICKS / wall,
            "steal_frac": (after.steal - before.steal) / total, "loadavg": after.loadavg}


def summarize_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Mean and worst of the rounds' loads (the mean weighted by each round's wall time)."""
    if not rounds:
        return {"other_cores_mean": 0.0, "other_cores_max": 0.0, "steal_frac": 0.0, "loadavg_max": 0.0}
    wall = sum(r["wall_s"] for r in rounds)
    loads = [r["loadavg"] for r in rounds if r["loadavg"] == r["loadavg"]]
    return {"other_cores_mean": sum(r["other_cores"] * r["wall_s"] for r in rounds) / wall,
            "other_cores_max": max(r["other_cores"] for r in rounds),
            "steal_frac": sum(r["steal_frac"] * r["wall_s"] for r in rounds) / wall,
            "loadavg_max": max(loads) if loads else 0.0}


def training_left(runs: list[tuple[list[dict[str, float]], int]]) -> tuple[int, int, float | None]:
    """How far runs that take turns are: ``(rounds trained, rounds in all, seconds left)``.

    Args:
        runs: Each run's rounds so far (:func:`round_load`'s records) and its rounds in all.

    Returns:
        The seconds left are each run's rounds to go at the median wall time of its rounds so far
        (a median: a round the machine was paused in does not move it), or, for a run with fewer
        than three, at the median of every run's rounds; ``None`` while no run has trained one.
    """
    done, total = sum(min(len(r), t) for r, t in runs), sum(t for _, t in runs)
    walls = [x["wall_s"] for r, _ in runs for x in r]
    if not walls:
        return done, total, None
    pooled = statistics.median(walls)
    left = sum((t - len(r)) * (statistics.median(x["wall_s"] for x in r) if len(r) >= 3 else pooled)
               for r, t in runs if len(r) < t)
    return done, total, float(left)


def duration_text(seconds: float) -> str:
    """``"about 2 h 05 min"``, ``"about 12 min"``, ``"under a minute"``: a time left, to a minute."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"


def assess(load: dict[str, float], step_times: list[float]) -> list[str]:
    """Warnings that say why a run's timings should not be trusted (none: trust them).

    Args:
        load: :func:`summarize_rounds` of the run's timed rounds.
        step_times: The run's timed step times (after warm-up).
    """
    warnings = []
    if load["other_cores_mean"] > OTHER_CORES_LIMIT:
        warnings.append(f"other processes kept {load['other_cores_mean']:.1f} cores busy while this "
                        f"run was timed (limit {OTHER_CORES_LIMIT})")
    if load["steal_frac"] > STEAL_LIMIT:
        warnings.append(f"the hypervisor took {load['steal_frac']:.0%} of CPU time (steal)")
    if len(step_times) >= 3:
        spread = float(np.percentile(step_times, 90)) / statistics.median(step_times)
        if spread > SPREAD_LIMIT:
            warnings.append(f"step times spread widely: p90 is {spread:.1f}x the median")
    return warnings


def machine_name(m: dict[str, Any]) -> str:
    """A run's ``machine`` record in words: the GPU or CPU, its flags, torch."""
    return f"{m['gpu'] or m['cpu']} ({', '.join(m['cpu_flags']) or 'no listed flags'}, torch {m['torch']})"


__all__ = ["CpuSample", "assess", "duration_text", "machine_info", "machine_name", "round_load",
           "summarize_rounds", "training_left"]
