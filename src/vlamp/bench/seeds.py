"""What a benchmark keeps so that it can go on (:func:`vlamp.bench.run.bench` with ``resume``).

Each seed's runs are written to ``out/seeds/seed-N.json`` as soon as they finish, under a hash of
the settings they ran with (config, steps, warmup, episodes, threads, rounds). With ``resume``, the
runs found there from a benchmark of the same settings are read instead of run again, so an
interrupted benchmark goes on where it stopped, ``seeds`` may grow and modes may be added (an
ablation grows a mode at a time; a run read back was timed beside the modes of its own
invocation). The runs of the seed in flight train in ``out/seeds/seed-N.runs/``, each
checkpointing at the end of every round: with ``resume`` they go on from there (bit for bit, their
earlier steps' losses and times read back), the torch.amp loop, which keeps no checkpoint, from its
first step. Without ``resume`` that directory is cleared; it is removed when the seed is written.
With ``all_seeds`` the table also takes the seeds kept beyond ``seeds``, for the modes that have
one beside its FP32 run, and trains none of them: a row given a seed more to narrow its interval
keeps it in the table of the whole ablation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from vlamp.bench.machine import machine_name
from vlamp.io import write_json, write_text_atomic
from vlamp.precision.errors import VlampError
from vlamp.train.config import RunConfig
from vlamp.train.config_io import to_dict

# Config keys added after benchmarks were kept (results/mt10-bench/seeds), each with the value
# that does what a config without it did: at that value it stays out of the settings key, so
# those benchmarks still resume. A key added to RunConfig goes here (tests/test_bench.py checks).
LATER_KEYS = {("train", "compile_backend"): "inductor"}


def settings_key(config: RunConfig, warmup: int, eval_episodes: int, threads: int | str,
                 round_steps: int) -> str:
    """What a run's results depend on besides its mode and seed, hashed: a run is resumed only
    into a benchmark of the same settings (which other modes run beside it does not matter).
    The dataset counts by its directory's name (a generated dataset's name says what generated
    it), not by where it lies, so a benchmark's seed files resume on another machine or cache."""
    cfg = to_dict(config)
    cfg["train"].pop("seed")  # the seed is the file's name
    for (section, name), value in LATER_KEYS.items():
        if cfg[section].get(name) == value:
            cfg[section].pop(name)
    if cfg["dataset"]["path"]:
        cfg["dataset"]["path"] = Path(cfg["dataset"]["path"]).name
    spec = json.dumps([cfg, warmup, eval_episodes, threads, round_steps], sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def runs_dir(path: Path, key: str, machine: dict[str, Any], resume: bool) -> Path:
    """The directory a seed's runs train in: kept from an interrupted benchmark of the same
    settings on the same machine with ``resume``, else made empty. Runs begun on another machine
    are refused: their step times would mix two machines' (finished seed files travel, these do
    not)."""
    settings, timed_on = path / "settings", path / "machine.json"
    if resume and path.is_dir():
        if not settings.is_file() or settings.read_text() != key:
            raise VlampError(f"--resume: {path} holds runs of a benchmark with other settings "
                             f"(config, steps, warmup, episodes, threads or rounds); give the same "
                             f"ones, or another --out")
        try:  # a directory from before machines were recorded counts as this machine's
            begun = json.loads(timed_on.read_text()) if timed_on.is_file() else machine
        except ValueError:
            raise VlampError(f"--resume: cannot read {timed_on}; delete {path} to run the seed "
                             f"again") from None
        if begun != machine:
            raise VlampError(f"--resume: {path} holds runs begun on another machine "
                             f"({machine_name(begun)}); their step times would mix "
                             f"two machines: delete that directory to run the seed again here")
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    write_text_atomic(settings, key)
    write_json(machine, timed_on)
    return path


def finished_seed(path: Path, key: str) -> list[dict[str, Any]]:
    """The runs of a seed earlier benchmarks of the same settings finished."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VlampError(f"--resume: cannot read {path} ({e}); delete it to run that seed again") from None
    if saved.get("settings") != key:
        raise VlampError(f"--resume: {path} holds a seed of a benchmark with other settings (config, "
                         f"steps, warmup, episodes, threads or rounds); give the same ones, or "
                         f"another --out")
    return saved["runs"]


def run_id(run: dict[str, Any]) -> tuple[str, str, int]:
    """A run's place in a benchmark's plan: (mode, runner, ranks)."""
    return run["mode"], run["runner"], run["ranks"]


def kept_beyond(seeds_dir: Path, first: int, key: str, plan: list[tuple[str, str, int]]
                ) -> list[dict[str, Any]]:
    """The runs of ``plan`` that the seed files of ``seeds_dir`` hold from seed ``first`` on, each
    with its seed's FP32 run; a run without one is left out (it has nothing to be paired with),
    and so is an FP32 run with nothing paired to it.

    Raises:
        VlampError: For a seed file of a benchmark with other settings than ``key``.
    """
    files = {int(p.stem[5:]): p for p in seeds_dir.glob("seed-*.json") if p.stem[5:].isdigit()}
    runs = []
    for seed in sorted(s for s in files if s >= first):
        have = {run_id(r): r for r in finished_seed(files[seed], key)}
        paired = [p for p in plan
                  if p[0] != "fp32" and p in have and ("fp32", "vlamp", p[2]) in have]
        refs = {("fp32", "vlamp", p[2]) for p in paired}
        read = [have[p] for p in plan if p in paired or p in refs]
        if read:
            print(f"seed {seed}: {len(read)} runs read from {files[seed]} (--all-seeds)",
                  file=sys.stderr, flush=True)
        runs += read
    return runs
