"""The benchmark report: a table and matplotlib plots, as Markdown and as HTML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vlamp.bench.summary import SUMMARY_CAPTION, group_rows, run_label, summary_table
from vlamp.report import Report

PLOTS = ("loss.png", "speed_memory.png", "memory_kinds.png", "loss_scale.png", "success.png",
         "vs_fp32.png")
# What a run holds, by kind: (results key, label)
MEMORY_KINDS = (("params_bytes", "weights"), ("masters_bytes", "FP32 masters"),
                ("grads_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
                ("compensation_bytes", "Kahan buffers"), ("activations_bytes", "activations"),
                ("data_bytes", "data in memory"))


GROUPS_CAPTION = ("success by Meta-World difficulty group, the seeds' episodes pooled (in brackets: "
                  "the paired difference from fp32 in points, 95% interval):")


def _fmt(v: Any, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Header plus one row per run; a run whose timings are not to be trusted is marked ``!``."""
    gpu = any(r.get("gpu_peak_bytes") for r in results["runs"])
    ranks = any(r.get("ranks", 1) > 1 for r in results["runs"])
    rows = [["run", "seed", "threads", "step time (s)", "samples/s",
             *(["per rank", "vs 1 process"] if ranks else []), "speed-up", "casts/step",
             *(["peak GPU (MiB)", "GPU memory"] if gpu else []),
             "peak RSS (MiB)", "memory", "state (MiB)", "val action L1", "success", "skipped"]]
    for r in results["runs"]:
        gpu_cells = [_fmt(r.get("gpu_peak_bytes") and r["gpu_peak_bytes"] / 2**20, "{:.0f}"),
                     _fmt(r.get("gpu_memory_vs_fp32"), "{:.2f}x")] if gpu else []
        rows.append([run_label(r) + (" !" if r.get("warnings") else ""), str(r["seed"]),
                     str(r.get("threads", "-")), f"{r['step_time_s_median']:.3f}",
                     f"{r['samples_per_s']:.0f}",
                     *([_fmt(r.get("samples_per_s_per_rank"), "{:.0f}"),
                        _fmt(r.get("scaleout_vs_1_process"), "{:.2f}x")] if ranks else []),
                     f"{r['speedup_vs_fp32']:.2f}x",
                     _fmt(r.get("casts_per_step"), "{}"), *gpu_cells,
                     f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['memory_vs_fp32']:.2f}x",
                     f"{r['state_bytes'] / 2**20:.1f}", _fmt(r["final_val_action_l1"], "{:.4f}"),
                     _fmt(r["success_rate"], "{:.0%}"), str(r["skipped_steps"])])
    return rows


def memory_rows(results: dict[str, Any]) -> list[list[str]]:
    """Header plus one row per run: MiB by kind (activations: what one step's forward saves for
    its backward, measured), the live tensors a forward+backward adds at its peak (PyTorch's
    profiler: what the step needs), the FP32 islands that hand on low precision (measured: see
    :mod:`vlamp.precision.lean`), the RSS before the first step and the peak RSS training added
    to it (what the allocator also kept)."""
    kinds = [(k, label) for k, label in MEMORY_KINDS  # a kind no run holds is left out
             if any(r.get(k) for r in results["runs"]) or k in ("params_bytes", "activations_bytes")]
    rows = [["run", "seed", *[label for _, label in kinds], "step adds (live)", "vs fp32",
             "lean islands", "RSS before 1st step", "RSS training added", "vs fp32"]]
    for r in results["runs"]:
        def mib(key: str, pattern: str = "{:.1f}") -> str:
            return _fmt(None if r.get(key) is None else r[key] / 2**20, pattern)
        rows.append([run_label(r), str(r["seed"]), *[mib(k) for k, _ in kinds],
                     mib("step_added_bytes"), _fmt(r.get("step_memory_vs_fp32"), "{:.2f}x"),
                     _fmt(r.get("lean_islands"), "{}"), mib("rss_before_training_bytes", "{:.0f}"), mib("training_rss_bytes", "{:.0f}"),
                     _fmt(r.get("training_memory_vs_fp32"), "{:.2f}x")])
    return rows


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def trust_lines(results: dict[str, Any]) -> list[str]:
    """What says the timings cannot be trusted (nothing when the machine was quiet)."""
    warned = results.get("warnings") or []
    if not warned:
        return []
    return ["! these timings are not trustworthy as they stand (why: below). Rerun on a quiet "
            "machine (nothing else running), each seed's runs on one machine, before reading the "
            "speed-ups.",
            *[f"! {w}" for w in warned]]


def text_table(results: dict[str, Any]) -> str:
    rows = results.get("summary") or []
    groups = group_rows(rows)
    return "\n".join([*_align(table_rows(results)), *trust_lines(results),
                      "", "memory by kind (MiB):", *_align(memory_rows(results)),
                      *(["", SUMMARY_CAPTION, *_align(summary_table(rows))] if rows else []),
                      *(["", GROUPS_CAPTION, *_align(groups)] if groups else [])])


def _plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        losses = np.asarray(r["losses"])
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k, smooth, label=f"{run_label(r)} s{r['seed']}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [f"{run_label(r)}\ns{r['seed']}" for r in runs]
    a.bar(names, [r["step_time_s_median"] for r in runs], color="tab:blue")
    a.set(ylabel="median step time (s)", title="Speed")
    if all(r.get("gpu_peak_bytes") for r in runs):
        b.bar(names, [r["gpu_peak_bytes"] / 2**20 for r in runs], color="tab:orange",
              label="peak GPU memory")
    else:
        b.bar(names, [r["peak_rss_bytes"] / 2**20 for r in runs], color="tab:orange", label="peak RSS")
    b.bar(names, [r["state_bytes"] / 2**20 for r in runs], color="tab:green",
          label="params+grads+optimizer")
    b.set(ylabel="MiB", title="Memory")
    b.legend(fontsize=8)
    for axis in (a, b):
        axis.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.8))
    bottom = np.zeros(len(runs))
    for key, label in MEMORY_KINDS:
        values = np.array([(r.get(key) or 0) / 2**20 for r in runs])
        if values.any():
            ax.bar(names, values, bottom=bottom, label=label)
            bottom += values
    added = [r.get("training_rss_bytes") for r in runs]
    if all(added):
        ax.scatter(names, [a / 2**20 for a in added], color="black", marker="_", s=600, zorder=3,
                   label="peak RSS training added")
    ax.set(ylabel="MiB", title="Memory by kind")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for r in runs:
        ax.plot(r["loss_scales"], label=f"{run_label(r)} s{r['seed']}")
    ax.set(xlabel="step", ylabel="loss scale", yscale="log", title="Loss scale (1 = no scaling)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=110)
    plt.close(fig)

    _success_plot(runs, out / PLOTS[4], plt)
    _vs_fp32_plot(results.get("summary") or [], out / PLOTS[5], plt)


def _success_plot(runs: list[dict[str, Any]], path: Path, plt) -> None:
    """Success per task, one bar per run (the mean over its seeds), wide enough for MT50's tasks."""
    by_run: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        if r["success_per_task"]:
            by_run.setdefault(run_label(r), []).append(r["success_per_task"])
    tasks = list(next(iter(by_run.values()))[0]) if by_run else []
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(tasks) * max(1, len(by_run))), 3.8))
    width = 0.8 / max(1, len(by_run))
    for i, (name, seeds) in enumerate(by_run.items()):
        ax.bar(np.arange(len(tasks)) + i * width,
               [100 * np.mean([s[t] for s in seeds]) for t in tasks], width,
               label=name + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8,
                  rotation=45 if len(tasks) > 6 else 0, ha="right" if len(tasks) > 6 else "center")
    ax.set(ylabel="success (%)", ylim=(0, 105), title="Closed-loop success per task")
    if by_run:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _vs_fp32_plot(summary: list[dict[str, Any]], path: Path, plt) -> None:
    """Each run against the FP32 run of its seed: the paired success difference with its 95%
    interval (every seed's episodes pooled), and the validation error's difference, per seed."""
    rows = [row for row in summary if not (row["mode"] == "fp32" and row["runner"] == "vlamp")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9.0, 2.4 * len(rows)), 3.8))
    paired = [row for row in rows if row["success_vs_fp32_ci95"]]
    for i, row in enumerate(paired):
        lo, hi = row["success_vs_fp32_ci95"]
        d = row["success_vs_fp32_points"]
        a.errorbar([i], [d], yerr=[[d - lo], [hi - d]], fmt="o", capsize=5)
        a.annotate(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]\n{row['success_pairs']['episodes']} episodes",
                   (i, d), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
    if not paired:
        a.text(0.5, 0.5, "no paired evaluation\n(--episodes 0)", ha="center", va="center",
               transform=a.transAxes, color="gray")
    a.axhline(0, color="gray", lw=0.8)
    a.set_xticks(range(len(paired)), [row["name"] for row in paired], fontsize=8)
    a.set(ylabel="points", title="Success vs fp32, paired (95% interval)")
    for i, row in enumerate(rows):
        pct = row.get("val_l1_vs_fp32_pct_per_seed") or []
        b.scatter([i] * len(pct), pct, color="tab:blue", label="a seed" if i == 0 else None)
        if pct:
            b.scatter([i], [row["val_l1_vs_fp32_pct"]], color="black", marker="_", s=400,
                      label="mean" if i == 0 else None)
    b.axhline(0, color="gray", lw=0.8)
    b.set_xticks(range(len(rows)), [row["name"] for row in rows], fontsize=8)
    b.set(ylabel="% (lower is better)", title="Validation action L1 vs fp32, same seed")
    if rows:
        b.legend(fontsize=8)
    for axis in (a, b):
        axis.tick_params(axis="x", labelrotation=30 if len(rows) > 3 else 0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Writes the plots, ``report.md`` and ``report.html`` into ``out``."""
    out = Path(out)
    _plots(results, out)
    m = results["machine"]
    machine = (f"{m['cpu']} ({m['cpu_cores']} cores, flags: {', '.join(m['cpu_flags'])}), "
               f"torch {m['torch']}")
    if m.get("gpu"):
        cap = ".".join(map(str, m.get("cuda_capability") or [])) or "?"
        tf32 = {r.get("tf32") for r in results["runs"]} - {None}
        machine = (f"{m['gpu']} (compute capability {cap}, driver {m.get('gpu_driver') or '?'}, "
                   f"CUDA {m.get('cuda') or '?'}, TF32 {'on' if tf32 == {True} else 'off' if tf32 == {False} else 'mixed'}) "
                   f"on {machine}")
    t = results["config"]["train"]
    inter = results.get("interleaved") or {}
    setup = (f"{t['steps']} steps at batch {t['batch_size']} per run, the runs taking turns "
             f"{inter.get('round_steps', '?')} steps at a time; medians after warm-up; ratios "
             f"against the FP32 run of the same invocation")
    report = Report("vlamp bench")
    report.paragraph(f"Machine: {machine}.")
    report.paragraph(setup + ".")
    for line in trust_lines(results):
        report.paragraph(line, warn=True)
    report.bullets(list(results["notes"]))
    report.table(table_rows(results))
    report.paragraph("Memory by kind (MiB): weights, FP32 masters, gradients, optimizer state and "
                     "Kahan buffers counted from the tensors; activations measured (what one step's "
                     "forward saves for its backward); data: the dataset's arrays in memory; step "
                     "adds: the live tensors a forward+backward adds at its peak (PyTorch's profiler); "
                     "RSS training added: the peak RSS over training above the RSS before it, which "
                     "also holds what the allocator kept.")
    report.table(memory_rows(results))
    rows = results.get("summary") or []
    if rows:
        report.paragraph(SUMMARY_CAPTION[0].upper() + SUMMARY_CAPTION[1:])
        report.table(summary_table(rows))
    groups = group_rows(rows)
    if groups:
        report.paragraph(GROUPS_CAPTION)
        report.table(groups)
    for plot in PLOTS:
        report.image(plot)
    return report.write(out)
