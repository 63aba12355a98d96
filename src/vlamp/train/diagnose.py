"""``vlamp diagnose RUN``: the numerical-health records of a run (``precision.diagnostics``) as a
report — the modules most at risk first, each with what to do, and module x step heatmaps."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from vlamp.precision.errors import VlampError
from vlamp.report import Report

# What counts as a finding (module statistics over the sampled steps).
HEADROOM_BITS = 4.0      # largest magnitude within 16x of the format's largest value
UNDERFLOW = 0.10         # a tenth of a low-precision module's incoming gradient zero or subnormal
LOST_UPDATES = 0.01      # a hundredth of a module's updates rounded away
PLOTS = ("grad_underflow.png", "headroom.png", "lost_updates.png", "loss_scale.png")


@dataclasses.dataclass
class Risk:
    """One module's findings, with a score to rank them (higher: more at risk)."""

    module: str
    dtype: str
    score: float
    findings: list[str]
    advice: list[str]


@dataclasses.dataclass
class Diagnosis:
    """A run's sampled steps, its modules (model order) and per statistic a module x step matrix
    (NaN where a module had no value that step)."""

    run_dir: Path
    steps: list[int]
    modules: list[str]
    dtypes: dict[str, str]
    matrices: dict[str, np.ndarray]
    loss_scale: list[tuple[int, float]]


def read(run_dir: str | Path) -> Diagnosis:
    """Reads the ``diag`` rows of a run's metrics.jsonl.

    Raises:
        VlampError: If the run has no metrics or no diagnostics.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise VlampError(f"{str(run_dir)!r} is not a run directory (no metrics.jsonl); give the "
                         f"output_dir of a `vlamp train` run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    diag = [r for r in rows if r.get("kind") == "diag"]
    if not diag:
        raise VlampError(f"run {str(run_dir)!r} recorded no diagnostics; train it with "
                         f"precision.diagnostics=every:50 (or resume it with that setting)")
    modules: dict[str, None] = {}
    dtypes: dict[str, str] = {}
    for r in diag:
        modules.update(dict.fromkeys(r["modules"]))
        dtypes.update(r.get("dtypes", {}))
    names, steps = list(modules), [r["step"] for r in diag]
    stats = sorted({k for r in diag for m in r["modules"].values() for k in m})
    matrices = {s: np.full((len(names), len(diag)), np.nan) for s in stats}
    index = {n: i for i, n in enumerate(names)}
    for j, r in enumerate(diag):
        for name, values in r["modules"].items():
            for stat, v in values.items():
                if v is not None:
                    matrices[stat][index[name], j] = v
    scales = [(r["step"], r["loss_scale"]) for r in rows if r.get("kind") == "train" and "loss_scale" in r]
    return Diagnosis(run_dir, steps, names, dtypes, matrices, scales)


def _worst(d: Diagnosis, stat: str, i: int, fn) -> float | None:
    row = d.matrices.get(stat)
    if row is None or np.all(np.isnan(row[i])):
        return None
    return float(fn(row[i][~np.isnan(row[i])]))


def risks(d: Diagnosis) -> list[Risk]:
    """Every module with a finding, most at risk first."""
    out = []
    for i, name in enumerate(d.modules):
        dtype = d.dtypes.get(name, "?")
        findings, advice, score = [], [], 0.0
        overflow = max((v for s in ("act_overflow", "grad_overflow")
                        if (v := _worst(d, s, i, np.max)) is not None), default=0.0)
        headroom = min((v for s in ("act_headroom_bits", "grad_headroom_bits")
                        if (v := _worst(d, s, i, np.min)) is not None), default=math.inf)
        underflow = _worst(d, "grad_underflow", i, np.mean) or 0.0
        lost = _worst(d, "lost_updates", i, np.mean) or 0.0
        if overflow > 0 or headroom < HEADROOM_BITS:
            findings.append(f"inf/NaN in {overflow:.2%} of values" if overflow > 0
                            else f"only {headroom:.1f} bits below {dtype}'s largest value")
            advice.append(f"keep it FP32 with a rule ({name}: fp32)"
                          + (", or train in bf16 (FP32's range)" if dtype == "fp16" else ""))
            score += 100 * overflow + max(0.0, HEADROOM_BITS - headroom)
        # Underflow is judged against what the format can represent: fp16's smallest normal is
        # 2^-14, so a gradient an fp32 run would hold can flush there. bf16 has fp32's exponent
        # range: its zeros are zeros in fp32 too (padding, masked positions, dead units), never a
        # reason to keep a module in fp32.
        if dtype == "fp16" and underflow > UNDERFLOW:
            findings.append(f"{underflow:.0%} of its incoming gradient zero or subnormal in {dtype}")
            advice.append("raise the loss scale (precision.scaler=dynamic, "
                          "precision.loss_scale.init_scale) or keep it FP32")
            score += 10 * underflow
        if lost > LOST_UPDATES:
            findings.append(f"{lost:.1%} of its updates rounded away")
            advice.append("keep FP32 master weights (a -mixed mode, or -true, which keeps them) or "
                          "raise the learning rate of this module")
            score += 10 * lost
        if findings:
            out.append(Risk(name, dtype, score, findings, advice))
    return sorted(out, key=lambda r: -r.score)


def _heatmap(d: Diagnosis, matrix: np.ndarray, title: str, label: str, path: Path, cmap: str,
             vmin: float | None = None, vmax: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(3.0, 0.14 * len(d.modules) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_yticks(range(len(d.modules)), d.modules, fontsize=6)
    ticks = np.linspace(0, len(d.steps) - 1, min(len(d.steps), 8)).astype(int)
    ax.set_xticks(ticks, [str(d.steps[t]) for t in ticks], fontsize=7)
    ax.set(xlabel="step", title=title)
    fig.colorbar(im, ax=ax, label=label, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(d: Diagnosis, out: str | Path, top: int = 15) -> tuple[Path, Path]:
    """Writes the heatmaps, ``report.md`` and ``report.html`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = d.matrices
    nan = np.full((len(d.modules), len(d.steps)), np.nan)
    _heatmap(d, m.get("grad_underflow", nan), "Incoming gradient zero or subnormal (in the dtype it is held in)",
             "fraction", out / PLOTS[0], "magma", 0.0, 1.0)
    headroom = np.fmin(m.get("act_headroom_bits", nan), m.get("grad_headroom_bits", nan))
    _heatmap(d, np.minimum(headroom, 40.0), "Headroom below the format's largest value (min of "
             "activations and gradients; capped at 40)", "bits", out / PLOTS[1], "viridis", 0.0, 40.0)
    _heatmap(d, m.get("lost_updates", nan), "Updates rounded away", "fraction", out / PLOTS[2],
             "magma", 0.0, max(0.05, float(np.nanmax(m["lost_updates"])) if "lost_updates" in m
                               and not np.all(np.isnan(m["lost_updates"])) else 0.05))
    fig, ax = plt.subplots(figsize=(7, 3))
    if d.loss_scale:
        ax.plot(*zip(*d.loss_scale))
    ax.set(xlabel="step", ylabel="loss scale", yscale="log", title="Loss scale")
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=110)
    plt.close(fig)

    found = risks(d)
    report = Report("vlamp diagnose")
    report.paragraph(f"Run {d.run_dir}: {len(d.steps)} sampled steps ({d.steps[0]} to {d.steps[-1]}), "
                     f"{len(d.modules)} modules watched.")
    report.heading("Modules most at risk")
    if found:
        report.table([["module", "dtype", "risk", "what happens", "what to do"]]
                     + [[r.module, r.dtype, f"{r.score:.1f}", "; ".join(r.findings), "; ".join(r.advice)]
                        for r in found[:top]])
        if len(found) > top:
            report.paragraph(f"... and {len(found) - top} more with smaller findings.")
    else:
        report.paragraph("Nothing found: no overflow, headroom above "
                         f"{HEADROOM_BITS:.0f} bits, low-precision gradients below "
                         f"{UNDERFLOW:.0%} underflow, under {LOST_UPDATES:.0%} of updates lost.")
    report.paragraph("Underflow counts values that are zero or subnormal in the module's compute "
                     "dtype; structural zeros (padding, masked positions) count too, so read it "
                     "against an fp32 run of the same model.")
    report.heading("Module x step")
    for plot in PLOTS:
        report.image(plot)
    return report.write(out)
