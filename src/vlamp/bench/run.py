"""The benchmark: train the same model on the same data once per precision mode (each in its own
process), plus a hand-written torch.amp loop as the baseline, then compare against FP32.

The runs take turns: every process is started and loads at once, then each measures its thread
count alone, then each trains a round of steps while the others wait, in rotating order, until all
are done (nothing timed overlaps anything else of the benchmark). A slow spell of the machine thus
falls on every mode alike instead of on whichever ran then,
and the CPU counters read around each round say whether anything else was running
(:mod:`vlamp.bench.machine`)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vlamp.bench.machine import (
    CpuSample,
    assess,
    duration_text,
    machine_info,
    machine_name,
    round_load,
    summarize_rounds,
    training_left,
)
from vlamp.bench.seeds import finished_seed, kept_beyond, run_id, runs_dir, settings_key
from vlamp.bench.summary import mixed_plans, one_machine, summarize
from vlamp.io import write_json
from vlamp.precision.dtypes import dtype_name
from vlamp.precision.errors import VlampError
from vlamp.precision.hardware import detect, native_formats, resolve_device
from vlamp.precision.modes import MODE_NAMES, get_mode
from vlamp.precision.weight_update import OPTIMIZER_STATES, UPDATES
from vlamp.train.config import RunConfig
from vlamp.train.config_io import to_dict, with_overrides
from vlamp.train.data import with_dataset_path


def default_modes(device: str | None = "auto") -> tuple[list[str], list[str]]:
    """FP32 plus each mixed mode whose format ``device`` computes natively; when it has none,
    FP32 against bf16-mixed (emulated, so slow). Returns the modes and notes on what was left out."""
    hw = detect(resolve_device(device))
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


def split_mode(label: str) -> tuple[str, str, str]:
    """A run's label -> (mode, ``precision.update``, ``precision.optimizer_state``):
    ``"bf16-true/kahan+8bit"`` -> ``("bf16-true", "kahan", "8bit")``; a plain mode updates its
    own way with its own state (``auto``). Overrides after an ``@`` are left out (see
    :func:`label_overrides`)."""
    label, plus, state = label.split("@", 1)[0].partition("+")
    mode, _, update = label.partition("/")
    return mode, update or "auto", state if plus else "auto"


def label_overrides(label: str) -> list[str]:
    """The config overrides a run's label carries after ``@`` signs:
    ``"bf16-mixed@precision.lean_islands=0"`` -> ``["precision.lean_islands=0"]``."""
    return label.split("@")[1:]


_SET_BY_BENCH = ("precision.mode", "precision.update", "precision.optimizer_state", "train.seed",
                 "output_dir")


def parse_modes(text: str, device: str | None = "auto") -> tuple[list[str], list[str]]:
    """``"bf16-mixed,fp16-mixed"`` -> the modes with fp32 first, and notes on modes ``device``
    only emulates. A ``-true`` mode may name how its weights are updated after a slash
    (``bf16-true/kahan``, ``/stochastic``, ``/naive``; see ``precision.update``), any mode
    its optimizer's state after a plus (``bf16-true/stochastic+8bit``, ``fp32+8bit``), and any
    mode config overrides of its own after ``@`` signs (``bf16-mixed@precision.lean_islands=0``:
    the same mode twice, A against B, in one benchmark)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        for item in label_overrides(m):
            key = item.split("=", 1)[0]
            if "=" not in item or key in _SET_BY_BENCH:
                raise VlampError(f"mode {m!r}: after an @ comes a config override key=value (e.g. "
                                 f"bf16-mixed@precision.lean_islands=0), not of "
                                 f"{', '.join(_SET_BY_BENCH)}, which the bench sets itself")
    bad = [m for m in modes if split_mode(m)[0] not in MODE_NAMES]
    if bad or not modes:
        raise VlampError(f"unknown mode(s) {', '.join(bad) or '(none)'}; legal: {', '.join(MODE_NAMES)}"
                         f", and -true or -storage modes with an update: bf16-true/kahan, /stochastic, /naive")
    for m in modes:
        mode, update, state = split_mode(m)
        if state not in OPTIMIZER_STATES:
            raise VlampError(f"mode {m!r}: the optimizer state after the plus is one of "
                             f"{', '.join(OPTIMIZER_STATES)}")
        stores_low = mode.endswith(("-true", "-storage"))
        if update not in ("auto", *UPDATES) or (update not in ("auto", "master") and not stores_low):
            raise VlampError(f"mode {m!r}: an update after the slash is for -true and -storage "
                             f"modes, one of {', '.join(UPDATES)}")
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference every ratio is taken against
    hw = detect(resolve_device(device))
    native = native_formats(hw)
    notes = [f"{m} runs emulated here: {hw.name} has no native {compute_format(m)} arithmetic"
             for m in dict.fromkeys(modes) if compute_format(m) not in ("fp32", *native)]
    return list(dict.fromkeys(modes)), notes


def compute_format(label: str) -> str:
    """The format a bench run's kernels compute in: ``bf16`` for ``bf16-mixed``, ``fp32`` for
    ``fp32`` and ``bf16-storage`` (bf16 weights, cast up for every kernel)."""
    return dtype_name(get_mode(split_mode(label)[0]).compute_dtype)


class _Worker:
    """One run's process, driven through the protocol of :mod:`vlamp.bench.worker`. The rounds it
    was timed in are kept in ``workdir/NAME.rounds.json`` as they end, so that a resumed run
    (:func:`bench` with ``resume``) keeps those of the rounds its checkpoint holds."""

    def __init__(self, name: str, spec: dict[str, Any], workdir: Path) -> None:
        self.name, self.rounds, self.trained = name, [], False
        spec_path, self.out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
        self.rounds_path = workdir / f"{name}.rounds.json"
        if self.rounds_path.is_file():  # an interrupted benchmark's: same threads, earlier rounds
            saved = json.loads(self.rounds_path.read_text())
            spec = {**spec, "threads": saved["threads"]}
            self.rounds = saved["rounds"]
        spec_path.write_text(json.dumps(spec))
        self.round_steps = spec["round_steps"]
        self.total = -(-spec["config"]["train"]["steps"] // self.round_steps)  # its rounds in all
        env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
        launch = [sys.executable]
        if spec.get("ranks", 1) > 1:  # real torchrun; rank 0 talks to us, the others only train
            launch += ["-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(spec["ranks"])]
            env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [*launch, "-m", "vlamp.bench.worker", str(spec_path), str(self.out_path)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True)

    def expect(self, *events: str) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise VlampError(f"benchmark run {self.name} failed (exit {self.proc.wait()}); "
                             f"its error is above")
        event = json.loads(line)
        if event.get("event") not in events:
            raise VlampError(f"benchmark run {self.name}: expected {'/'.join(events)}, got {event}")
        return event

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ready(self) -> int:
        """Lets the loaded run choose its threads; returns the step it starts from (> 0: resumed)."""
        self.send("probe")
        event = self.expect("ready")
        step = event.get("step", 0)
        self.rounds = self.rounds[:-(-step // self.round_steps)]  # those its checkpoint holds
        self.threads = event["threads"]
        return step

    def round(self) -> None:
        """Lets the run train one round while every other run waits; records the machine's load."""
        before = CpuSample.read(self.proc.pid)
        self.send("go")
        self.trained = self.expect("paused", "trained")["event"] == "trained"
        after = CpuSample.read(self.proc.pid)
        self.rounds.append({**round_load(before, after), "start": before.wall, "end": after.wall})
        write_json({"threads": self.threads, "rounds": self.rounds}, self.rounds_path)

    def finish(self) -> None:
        """Lets the run (trained) validate, evaluate and write its result: :meth:`result`."""
        self.send("finish")

    def result(self) -> dict[str, Any]:
        """Waits for the result :meth:`finish` asked for and returns it."""
        self.expect("done")
        self.proc.wait()
        return json.loads(self.out_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _run_interleaved(specs: list[tuple[str, dict[str, Any]]], workdir: Path, progress: bool,
                     side_by_side: int = 1) -> list[dict[str, Any]]:
    """Runs ``specs`` taking turns (see :class:`_Worker`); then ``side_by_side`` of them at a time
    validate, evaluate and write their results (nothing of that is timed)."""
    workers: list[_Worker] = []
    try:
        for name, spec in specs:  # the processes start and load together (imports, data, model)
            if progress:
                print(f"  start {name}", file=sys.stderr, flush=True)
            workers.append(_Worker(name, spec, workdir))
        for w in workers:
            w.expect("loaded")
        for w in workers:  # then one at a time: a run's thread probe is timed with the others idle
            step = w.ready()
            if step:  # said even without progress bars: what was resumed is not progress
                print(f"  {w.name}: resumed at step {step} (--resume)", file=sys.stderr, flush=True)
        turn = 0
        while not all(w.trained for w in workers):
            for w in workers[turn % len(workers):] + workers[:turn % len(workers)]:
                if not w.trained:
                    w.round()
            turn += 1
            if progress:  # a benchmark of hours says how far it is after every turn
                done, total, left = training_left([(w.rounds, w.total) for w in workers])
                eta = f"; {duration_text(left)} of training left" if left else ""
                print(f"\n  {done} of {total} rounds trained{eta}", file=sys.stderr, flush=True)
        for w in workers[:side_by_side]:
            w.finish()
        results = []
        for i, (w, (_, spec)) in enumerate(zip(workers, specs)):
            r = w.result()
            if i + side_by_side < len(workers):  # the next run takes the freed place
                workers[i + side_by_side].finish()
            r["load"] = summarize_rounds(w.rounds)
            r["round_windows"] = [(x["start"], x["end"]) for x in w.rounds]
            r["warnings"] = assess(r["load"], r["step_times"][spec["warmup"]:] or r["step_times"])
            results.append(r)
        return results
    finally:
        for w in workers:
            w.stop()


def bench(config: RunConfig, modes: list[str], out: str | os.PathLike[str], *, seeds: int = 1,
          warmup: int = 5, eval_episodes: int = 5, baseline: bool = True, notes: list[str] | None = None,
          threads: int | str = "auto", rounds: int = 10, progress: bool = True,
          nproc: int = 1, resume: bool = False, all_seeds: bool = False) -> dict[str, Any]:
    """Runs every mode (and the torch.amp baseline for the first low-precision mode), ``seeds``
    times each, writes ``out/results.json`` and the report, and returns the results.

    Each (mode, seed) trains ``config.train.steps`` steps in a process of its own; the runs of a seed
    take turns in ``rounds`` rounds. The step-time median skips the first ``warmup`` steps. Ratios
    are against the FP32 run of the same invocation, seed and rank count. ``threads``: torch
    threads per run, or ``"auto"`` (each run measures 1 against all and takes the faster).
    ``nproc`` > 1: every mode trains on that many torchrun ranks (``config.distributed`` says
    DDP or FSDP2; ``train.batch_size`` is per rank), beside one single-process FP32 run that the
    ranks' total throughput is compared with (``scaleout_vs_1_process``); the torch.amp baseline
    stays in one process.

    Each seed's runs are written to ``out/seeds/seed-N.json`` as soon as they finish. With
    ``resume`` the runs found there are read instead of run again and the seed in flight goes on
    from its runs' last rounds; with ``all_seeds`` too, the seeds kept beyond ``seeds`` are read
    as well (see :mod:`vlamp.bench.seeds`).

    Raises:
        VlampError: With ``resume``, for a seed ``out`` holds from a benchmark of other settings;
            ``all_seeds`` without ``resume``.
    """
    if all_seeds and not resume:
        raise VlampError("--all-seeds reports the seeds kept in --out: give --resume too")
    for mode in modes:
        mode_config(config, mode)  # a bad override is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = with_dataset_path(config, progress)  # generated once here, not by every run at once
    low = next((split_mode(m)[0] for m in modes if compute_format(m) != "fp32"), None)
    plan = [(m, "vlamp", nproc) for m in modes] + ([("fp32", "vlamp", 1)] if nproc > 1 else []) \
        + ([(low, "torch.amp", 1)] if baseline and low else [])
    round_steps = max(1, math.ceil(config.train.steps / max(1, rounds)))
    runs: list[dict[str, Any]] = []
    started = time.time()
    machine = machine_info(resolve_device(config.train.device))
    timed_on = {k: machine[k] for k in ("cpu", "cpu_flags", "gpu", "torch")}
    # runs that evaluate in their own process alone (eval.workers=1) do it side by side, one a core
    side_by_side = (os.cpu_count() or 1) if config.eval.workers == 1 and not machine["gpu"] else 1
    key = settings_key(config, warmup, eval_episodes, threads, round_steps)
    for seed in range(seeds):
        done = out / "seeds" / f"seed-{config.train.seed + seed}.json"
        saved = finished_seed(done, key) if resume and done.is_file() else []
        have = {run_id(r): r for r in saved}
        todo = [p for p in plan if p not in have]
        if saved:
            print(f"seed {config.train.seed + seed}: {len(plan) - len(todo)} runs read from {done} "
                  f"(--resume)", file=sys.stderr, flush=True)
        if todo:
            workdir = runs_dir(done.with_suffix(".runs"), key, timed_on, resume)
            specs = [_run_spec(config, mode, runner, ranks, seed, workdir, warmup, threads,
                               round_steps, eval_episodes, progress) for mode, runner, ranks in todo]
            if progress:
                print(f"seed {config.train.seed + seed}: {len(specs)} runs taking turns, "
                      f"{round_steps} steps a turn", file=sys.stderr, flush=True)
            finished = [{**r, "seed": config.train.seed + seed, "machine": timed_on}
                        for r in _run_interleaved(specs, workdir, progress, side_by_side)]
            saved += finished  # runs of other modes an earlier benchmark finished are kept
            write_json({"settings": key, "runs": saved}, done, compact=True)  # kept, even committed
            shutil.rmtree(workdir)
            have.update((run_id(r), r) for r in finished)
        runs += [have[p] for p in plan]
    if all_seeds:
        runs += kept_beyond(out / "seeds", config.train.seed + seeds, key, plan)
    add_ratios(runs)
    warned = [f"{_run_name(r)}: {w}" for r in runs for w in r["warnings"]]
    results = {"machine": machine,
               "config": to_dict(config), "modes": modes, "summary": summarize(runs),
               "notes": [*(notes or []), *mixed_plans(runs)], "warnings": warned,
               "seconds": time.time() - started,
               "interleaved": {"round_steps": round_steps, "threads": threads}, "runs": runs}
    write_json(results, out / "results.json")
    from vlamp.bench.report import write_report

    write_report(results, out)
    return results


def _run_spec(config: RunConfig, mode: str, runner: str, ranks: int, seed: int, workdir: Path,
              warmup: int, threads: int | str, round_steps: int, eval_episodes: int,
              progress: bool) -> tuple[str, dict[str, Any]]:
    """One run's name and what its worker process is given."""
    cfg = to_dict(mode_config(config, mode))
    p = cfg["precision"]
    p["mode"], p["update"], p["optimizer_state"] = split_mode(mode)
    cfg["train"]["seed"] = config.train.seed + seed
    name = (f"{re.sub(r'[^A-Za-z0-9_.=-]', '-', mode)}-{runner.replace('.', '')}"
            f"-x{ranks}-s{cfg['train']['seed']}")
    cfg["output_dir"] = str(workdir / name)  # the worker resumes it if it holds a checkpoint
    return name, {"config": cfg, "label": mode, "runner": runner, "warmup": warmup,
                  "threads": threads if ranks == 1 else 1, "ranks": ranks,
                  "round_steps": round_steps, "eval_episodes": eval_episodes, "progress": progress}


def mode_config(config: RunConfig, label: str) -> RunConfig:
    """``config`` with the overrides of a run's label applied (see :func:`label_overrides`).

    Raises:
        VlampError: On an unknown key or a value of the wrong type, naming the label.
    """
    over = label_overrides(label)
    return with_overrides(config, over, f"--modes {label}") if over else config


def _run_name(r: dict[str, Any]) -> str:
    return f"{r['mode']} ({r['runner']}, seed {r['seed']})"


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """``speedup_vs_fp32`` = FP32 median step time / this run's; ``memory_vs_fp32`` = this run's
    peak RSS / FP32's; ``state_vs_fp32`` likewise for parameter+gradient+optimizer bytes,
    ``activations_vs_fp32`` for the activations a step saves, ``step_memory_vs_fp32`` for the
    live tensor memory a forward+backward adds at its peak, ``training_memory_vs_fp32`` for the
    peak RSS training added to what the process held before its first step;
    ``gpu_memory_vs_fp32`` for peak GPU memory (runs on a GPU); each against the vlamp FP32 run of
    the same seed and rank count. ``scaleout_vs_1_process``: a multi-rank run's samples/s (all
    ranks) over the single-process FP32 run's. A run timed on another machine than its FP32 run
    (a seed file carried to another machine and a mode added there) gets a warning saying so."""
    ref = {(r["seed"], r.get("ranks", 1)): r for r in runs if r["mode"] == "fp32" and r["runner"] == "vlamp"}
    for r in runs:
        f = ref[(r["seed"], r.get("ranks", 1))]
        if not one_machine(r, f):
            r["warnings"] = [*r["warnings"], (f"timed on {machine_name(r['machine'])}, its fp32 run on "
                                              f"{machine_name(f['machine'])}: the ratios compare two machines")]
        one = ref.get((r["seed"], 1))
        r["scaleout_vs_1_process"] = r["samples_per_s"] / one["samples_per_s"] \
            if r.get("ranks", 1) > 1 and one is not None else None
        r["speedup_vs_fp32"] = f["step_time_s_median"] / r["step_time_s_median"]
        r["memory_vs_fp32"] = r["peak_rss_bytes"] / f["peak_rss_bytes"]
        r["state_vs_fp32"] = r["state_bytes"] / f["state_bytes"]
        r["activations_vs_fp32"] = r["activations_bytes"] / f["activations_bytes"] \
            if r.get("activations_bytes") and f.get("activations_bytes") else None
        live, live_ref = r.get("step_added_bytes"), f.get("step_added_bytes")
        r["step_memory_vs_fp32"] = live / live_ref if live and live_ref else None
        added, added_ref = r.get("training_rss_bytes"), f.get("training_rss_bytes")
        r["training_memory_vs_fp32"] = added / added_ref if added and added_ref else None
        gpu, gpu_ref = r.get("gpu_peak_bytes"), f.get("gpu_peak_bytes")
        r["gpu_memory_vs_fp32"] = gpu / gpu_ref if gpu and gpu_ref else None


QUICK_TASKS = "drawer-open,drawer-close"


def quick_overrides() -> list[str]:
    """A seconds-long setting: a tiny TinyVLA on a tiny dataset (2 tasks x 3 episodes, 32x32),
    generated into the cache on first use."""
    from vlamp.data.generate import generate

    path = generate(QUICK_TASKS, 3, image_size=32, workers=1, progress=False)
    return [f"dataset.path={path}", "dataset.val_episodes=1", "model.dim=32", "model.depth=1",
            "model.heads=2", "model.text_layers=1", "model.channels=[8,8]", "model.chunk=4",
            "train.batch_size=8", "train.steps=10", "train.warmup_steps=2", "train.log_every=1",
            "eval.max_steps=40", "eval.workers=1"]  # (two short episodes: no processes to start)
