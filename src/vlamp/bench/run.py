"""The benchmark: train the same model on the same data once per precision mode (each in its own
process), plus a hand-written torch.amp loop as the baseline, then compare against FP32."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlamp.io import write_text_atomic
from vlamp.precision.errors import VlampError
from vlamp.precision.hardware import choose_mode, detect, native_formats
from vlamp.precision.modes import MODE_NAMES
from vlamp.train.config import RunConfig, to_dict


def default_modes() -> tuple[list[str], list[str]]:
    """FP32 plus each mixed mode whose format this machine computes natively; when it has none,
    FP32 against bf16-mixed (emulated, so slow). Returns the modes and notes on what was left out."""
    hw = detect()
    native = native_formats(hw)
    modes, notes = ["fp32"], []
    for fmt in ("bf16", "fp16"):
        if fmt in native:
            modes.append(f"{fmt}-mixed")
    if len(modes) == 1:
        modes.append("bf16-mixed")
        notes.append(f"{hw.name} has no native bf16 arithmetic: bf16-mixed runs emulated, to show "
                     f"what it costs here")
    if "fp16" not in native:
        notes.append(f"fp16 modes left out: {hw.name} has no native fp16 arithmetic, so they run "
                     f"far slower than fp32 (pass --modes to run them anyway)")
    return modes, notes


def parse_modes(text: str) -> tuple[list[str], list[str]]:
    """``"bf16-mixed,fp16-mixed"`` -> the modes with fp32 first, and notes on modes this machine
    only emulates."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODE_NAMES]
    if bad or not modes:
        raise VlampError(f"unknown mode(s) {', '.join(bad) or '(none)'}; legal: {', '.join(MODE_NAMES)}")
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference every ratio is taken against
    hw = detect()
    native = native_formats(hw)
    notes = [f"{m} runs emulated here: {hw.name} has no native {m.split('-')[0]} arithmetic"
             for m in dict.fromkeys(modes) if m != "fp32" and m.split("-")[0] not in native]
    return list(dict.fromkeys(modes)), notes


def machine_info() -> dict[str, Any]:
    hw = detect()
    return {"device": hw.device, "cpu": detect("cpu").name, "cpu_flags": list(hw.cpu_flags),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": hw.name if hw.device == "cuda" else None,
            "cuda_capability": list(hw.cuda_capability) if hw.cuda_capability else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "auto_mode": choose_mode(hw).mode, "native_low_precision": list(native_formats(hw))}


def _run_one(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    name = f"{spec['config']['precision']['mode']}-{spec['runner'].replace('.', '')}"
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    p = subprocess.run([sys.executable, "-m", "vlamp.bench.worker", str(spec_path), str(out_path)],
                       env=env, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if p.returncode != 0 or not out_path.exists():
        raise VlampError(f"benchmark run {name} failed (exit {p.returncode}); its error is above")
    return json.loads(out_path.read_text())


def bench(config: RunConfig, modes: list[str], out: str | os.PathLike[str], *, seeds: int = 1,
          warmup: int = 5, eval_episodes: int = 5, baseline: bool = True, notes: list[str] | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Runs every mode (and the torch.amp baseline for the first low-precision mode), ``seeds``
    times each, writes ``out/results.json`` and the report, and returns the results.

    Each (mode, seed) trains ``config.train.steps`` steps in a fresh process; the step-time median
    skips the first ``warmup`` steps. Ratios are against the FP32 run of the same invocation and seed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    low = next((m for m in modes if m != "fp32"), None)
    plan = [(m, "vlamp") for m in modes] + ([(low, "torch.amp")] if baseline and low else [])
    runs: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vlamp-bench-") as tmp:
        for seed in range(seeds):
            for i, (mode, runner) in enumerate(plan):
                cfg = to_dict(config)
                cfg["precision"]["mode"] = mode
                cfg["train"]["seed"] = config.train.seed + seed
                cfg["output_dir"] = str(Path(tmp) / f"run-{mode}-{runner}-{seed}")
                cfg["resume"] = False
                if progress:
                    print(f"[{i + 1 + seed * len(plan)}/{len(plan) * seeds}] {mode} ({runner}), "
                          f"seed {cfg['train']['seed']}", file=sys.stderr, flush=True)
                spec = {"config": cfg, "runner": runner, "warmup": warmup,
                        "eval_episodes": eval_episodes, "progress": progress}
                runs.append({**_run_one(spec, Path(tmp)), "seed": cfg["train"]["seed"]})
    add_ratios(runs)
    results = {"machine": machine_info(), "config": to_dict(config), "modes": modes,
               "notes": list(notes or []), "seconds": time.time() - started, "runs": runs}
    write_json(results, out / "results.json")
    from vlamp.bench.report import write_report

    write_report(results, out)
    return results


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """``speedup_vs_fp32`` = FP32 median step time / this run's; ``memory_vs_fp32`` = this run's
    peak RSS / FP32's; ``state_vs_fp32`` likewise for parameter+gradient+optimizer bytes; each
    against the vlamp FP32 run of the same seed."""
    ref = {r["seed"]: r for r in runs if r["mode"] == "fp32" and r["runner"] == "vlamp"}
    for r in runs:
        f = ref[r["seed"]]
        r["speedup_vs_fp32"] = f["step_time_s_median"] / r["step_time_s_median"]
        r["memory_vs_fp32"] = r["peak_rss_bytes"] / f["peak_rss_bytes"]
        r["state_vs_fp32"] = r["state_bytes"] / f["state_bytes"]


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


QUICK_TASKS = "drawer-open,drawer-close"


def quick_overrides() -> list[str]:
    """A seconds-long setting: a tiny TinyVLA on a tiny dataset (2 tasks x 3 episodes, 32x32),
    generated into the cache on first use."""
    from vlamp.data.generate import generate

    path = generate(QUICK_TASKS, 3, image_size=32, workers=1, progress=False)
    return [f"dataset.path={path}", "dataset.val_episodes=1", "model.dim=32", "model.depth=1",
            "model.heads=2", "model.text_layers=1", "model.channels=[8,8]", "model.chunk=4",
            "train.batch_size=8", "train.steps=10", "train.warmup_steps=2", "train.log_every=1",
            "eval.max_steps=40"]
