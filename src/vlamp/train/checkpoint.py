"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, every file
checksummed, written to a temporary directory and renamed into place; the newest K are kept.

Layout of ``<run>/checkpoints/step_000500/``::

    model.safetensors   the model's state dict (in its storage dtypes)
    train.safetensors   optimizer state tensors, FP32 master weights, EMA weights, torch RNG state
    state.json          step, config, tokenizer, precision state, optimizer hyper-parameters, NumPy RNG
    checksums.json      SHA-256 of the three files above
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from vlamp.models.config import saved_model_config
from vlamp.precision.errors import VlampError

FILES = ("model.safetensors", "train.safetensors", "state.json")
FORMAT = 1  # the version of state.json's layout; written as "format", checked on load
# What state.json must hold, and the tensor every train.safetensors has.
STATE_KEYS = ("format", "step", "applied_steps", "config", "tokenizer", "stats", "tasks",
              "image_size", "precision", "optimizer", "numpy_rng")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(VlampError):
    """A checkpoint that is missing, truncated, corrupted or of another model."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: ``state`` is the JSON, ``model`` and ``train`` tensors."""

    path: Path
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    train: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits an optimizer's state dict into tensors (``optim.<param>.<key>``) and JSON data."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not fit this model: {e}") from None
    # Saved tensors are contiguous; give each state tensor its parameter's memory layout again
    # (channels-last convolutions), or a resumed step runs other kernels and rounds differently.
    with torch.no_grad():
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any],
                    model: dict[str, torch.Tensor], train: dict[str, torch.Tensor],
                    keep_last: int = 3) -> Path:
    """Writes ``run_dir/checkpoints/step_<step>`` atomically and prunes all but the newest
    ``keep_last``. Returns the checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, tmp / FILES[0])
    save_file({k: v.detach().cpu().contiguous() for k, v in train.items()}, tmp / FILES[1])
    (tmp / FILES[2]).write_text(json.dumps({**state, "step": step}, indent=1))
    (tmp / "checksums.json").write_text(json.dumps({f: _sha256(tmp / f) for f in FILES}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and verifies one checkpoint directory (or a run directory: its newest valid one).

    Raises:
        CheckpointError: If a file is missing or its checksum does not match.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if not (path / "checksums.json").exists() and not (path / "state.json").exists():
        return latest_checkpoint(path)  # a run directory
    try:
        sums = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: checksums.json is missing or unreadable") from None
    blobs = {}
    for name in FILES:  # each file is read once: hashed, then parsed from the same bytes
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        blobs[name] = f.read_bytes()
        if hashlib.sha256(blobs[name]).hexdigest() != sums.get(name):
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated or corrupted)")
    try:
        ckpt = Checkpoint(path, json.loads(blobs[FILES[2]]), load(blobs[FILES[0]]), load(blobs[FILES[1]]))
    except (ValueError, SafetensorError) as e:  # checksummed files that do not parse
        raise CheckpointError(f"{path}: unreadable: {e}") from None
    _validate(ckpt)
    return ckpt


def _validate(c: Checkpoint) -> None:
    """A checksummed checkpoint can still be of another layout (older, or not vlamp's)."""
    if not isinstance(c.state, dict):
        raise CheckpointError(f"{c.path}: state.json is not a mapping")
    version = c.state.get("format")
    if version != FORMAT:
        raise CheckpointError(f"{c.path}: checkpoint format {version!r}, this vlamp reads format "
                              f"{FORMAT}")
    missing = [k for k in STATE_KEYS if k not in c.state]
    missing += [f"precision.{k}" for k in ("mode",) if k not in (c.state.get("precision") or {})]
    missing += [f"train.safetensors:{k}" for k in ("rng.torch",) if k not in c.train]
    if missing:
        raise CheckpointError(f"{c.path}: state.json lacks {', '.join(missing)} (not a complete "
                              f"vlamp checkpoint of format {FORMAT})")


def latest_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest checkpoint of a run that verifies; older ones are tried with a warning.

    Raises:
        CheckpointError: If the run has no valid checkpoint.
    """
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoints in {str(run_dir)!r} (expected {run_dir}/checkpoints/step_*)")
    problems = []
    for path in reversed(candidates):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping checkpoint: {e}; trying the previous one", stacklevel=2)
            continue
        return ckpt
    raise CheckpointError(f"no valid checkpoint in {str(run_dir)!r}: " + "; ".join(problems))


def kahan_weights(model: dict[str, torch.Tensor], train: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """The weights a Kahan-updated run really had, ``w + c`` in FP32, by parameter name, from a
    checkpoint's stored weights and its ``update.kahan.NAME`` buffers."""
    prefix = "update.kahan."
    return {k.removeprefix(prefix): model[k.removeprefix(prefix)].float() + v.float()
            for k, v in train.items() if k.startswith(prefix) and k.removeprefix(prefix) in model}


def resume_note(saved: dict[str, Any], mode: str, update: str) -> str | None:
    """What a resume in ``mode`` with ``update`` carries over from a run saved with the precision
    state ``saved``; ``None`` when both are the same."""
    saved_mode, saved_update = saved["mode"], saved.get("update", "master")
    if (saved_mode, saved_update) == (mode, update):
        return None
    if saved_update == update:
        return (f"resuming a {saved_mode} run in {mode}: weights and optimizer state carry over, "
                f"loss-scaler state only where the scaler type matches")
    kept = {"master": "their FP32 masters",
            "kahan": "the stored weights plus their Kahan compensation (w + c)"}.get(
        saved_update, "the stored weights")
    into = {"master": "start the FP32 masters",
            "kahan": "set the stored weights and their compensation"}.get(
        update, "are rounded into the stored weights")
    note = (f"resuming a {saved_mode} run updated by {saved_update} with precision.update={update}: "
            f"{kept} {into}")
    if update in ("stochastic", "naive") and saved_update in ("master", "kahan"):
        note += f"; what {saved_update} kept below the stored weights' precision is dropped"
    return note


def check_same_model(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raises :class:`CheckpointError` unless a checkpoint's model config (``saved``) is the
    config's (``now``): resuming other weights into a different model would fail later, unclearly."""
    saved = saved_model_config(saved)
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in now.items()
            if saved.get(k) != v]
    if diff:
        raise CheckpointError("the checkpoint is of a different model config (" + "; ".join(diff)
                              + "); resume with the run's own config.yaml")
