"""A run's logs: ``metrics.jsonl`` (one JSON row per record, with its ``kind``) and TensorBoard
events, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlamp.io import write_text_atomic


class RunLog:
    """Where the trainer writes its records. ``RunLog(None)`` (the other ranks) writes nothing.

    Args:
        run_dir: The run directory, or ``None``.
        purge_step: On resume, the checkpoint's step: TensorBoard drops later events.
    """

    def __init__(self, run_dir: Path | None, purge_step: int | None = None) -> None:
        self.writer = self.metrics = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step or None)
            self.metrics = open(run_dir / "metrics.jsonl", "a")

    def row(self, kind: str, row: dict[str, Any]) -> None:
        """One record: a metrics row and a TensorBoard scalar per number (``kind/key``)."""
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):  # (a label, such as predicted_at: no)
                self.writer.add_scalar(f"{kind}/{k}", v, row["step"])
        self._write({"kind": kind, **row})

    def diagnostics(self, record: dict[str, Any]) -> None:
        """A sampled step's numerical health: one metrics row (``kind: diag``), per-module
        TensorBoard scalars, and a histogram across modules of each statistic."""
        if self.writer is None:
            return
        step = record["step"]
        by_stat: dict[str, list[float]] = {}
        for module, stats in record["modules"].items():
            for stat, value in stats.items():
                if value is not None:
                    self.writer.add_scalar(f"diag/{stat}/{module}", value, step)
                    by_stat.setdefault(stat, []).append(value)
        for stat, values in by_stat.items():
            self.writer.add_histogram(f"diag_across_modules/{stat}", np.asarray(values), step)
        self._write({"kind": "diag", **record})

    def _write(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.metrics.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drops metric rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(r + "\n" for r in rows))
