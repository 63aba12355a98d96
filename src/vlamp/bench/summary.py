"""What the bench's runs say across seeds: each mode's mean and spread, and whether its difference
from FP32 is more than the noise.

Runs of the same seed start from the same weights and see the same batches, so each mode is compared
with the FP32 run *of its seed*: validation error by a paired t-test over seeds (it needs two seeds
or more), closed-loop success by pooling every seed's episode pairs (the evaluation seeds are the
same in every run) into one paired table — McNemar's exact test and the Agresti-Min interval of
:mod:`vlamp.sim.compare`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from vlamp.sim.compare import mcnemar_exact, paired_difference_interval

ALPHA = 0.05


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def one_machine(run: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Whether a run was timed on the machine its FP32 run was (runs that do not say: yes)."""
    a, b = run.get("machine"), ref.get("machine")
    return not a or not b or a == b


def _paired_t(diffs: Sequence[float]) -> float | None:
    """Two-sided p-value of a paired t-test (``None`` below two pairs)."""
    if len(diffs) < 2:
        return None
    if statistics.stdev(diffs) == 0:
        return 1.0 if statistics.fmean(diffs) == 0 else 0.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(diffs, 0.0).pvalue)


def _success_pairs(run: dict[str, Any], ref: dict[str, Any],
                   tasks: set[str] | None = None) -> list[int] | None:
    """The paired table (both, only FP32, only this run, neither) of one seed, over ``tasks``
    (default: all), or ``None``."""
    a, b = ref.get("success_outcomes"), run.get("success_outcomes")
    if not a or not b or list(a) != list(b):
        return None
    cells = [0, 0, 0, 0]
    for task in a:
        if tasks is None or task in tasks:
            for x, y in zip(a[task], b[task]):
                cells[0 if x and y else 1 if x else 2 if y else 3] += 1
    return cells


def _paired(tables: list[list[int]]) -> dict[str, Any]:
    """Paired tables pooled: the success difference (points), its 95% interval and McNemar's p."""
    both, only_ref, only_run, neither = (sum(t[i] for t in tables) for i in range(4))
    n = both + only_ref + only_run + neither
    lo, hi = paired_difference_interval(both, only_ref, only_run, neither)
    return {"points": 100 * (only_run - only_ref) / n, "ci95": [100 * lo, 100 * hi],
            "p": mcnemar_exact(only_ref, only_run),
            "pairs": {"episodes": n, "only_fp32": only_ref, "only_this": only_run}}


def _by_group(group: list[dict[str, Any]], fp32: dict[int, dict[str, Any]],
              is_ref: bool) -> dict[str, dict[str, Any]] | None:
    """Success per Meta-World difficulty group, the seeds' episodes pooled, and (``is_ref``
    aside) paired against FP32 within the group; ``None`` unless the tasks span two groups."""
    from vlamp.sim.tasks import difficulty_groups

    outcomes = [r["success_outcomes"] for r in group if r.get("success_outcomes")]
    if not outcomes:
        return None
    members = {g: set(tasks) for g, tasks in difficulty_groups(list(outcomes[0])).items()}
    if len(members) < 2:
        return None
    out = {}
    for g, tasks in members.items():
        episodes = [x for o in outcomes for t in tasks for x in o[t]]
        out[g] = {"tasks": len(tasks), "success": sum(map(bool, episodes)) / len(episodes)}
        tables = [] if is_ref else [
            t for r in group for t in [_success_pairs(r, fp32[r["seed"]], tasks)] if t]
        if tables:
            out[g]["vs_fp32"] = _paired(tables)
    return out


def run_label(r: dict[str, Any]) -> str:
    """How a run is named in tables and plots: its mode, and its runner or rank count."""
    if r["runner"] != "vlamp":
        return f"{r['mode']} (torch.amp loop)"
    ranks = r.get("ranks", 1)
    return r["mode"] if ranks == 1 else f"{r['mode']} x{ranks} ranks ({r.get('strategy')})"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, runner, ranks): seeds, speed-up, validation L1 and success as mean and standard
    deviation over seeds, and against the FP32 run of each seed: the L1 difference (percent) with a
    paired t-test, the success difference (points) with its paired interval and McNemar's test, and
    a verdict for each (``within noise`` / ``differs``, at 5%)."""
    refs = {(r["seed"], r.get("ranks", 1)): r for r in runs
            if r["mode"] == "fp32" and r["runner"] == "vlamp"}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(run_label(r), []).append(r)
    rows = []
    for name, group in groups.items():
        mode, runner, ranks = group[0]["mode"], group[0]["runner"], group[0].get("ranks", 1)
        fp32 = {seed: ref for (seed, n), ref in refs.items() if n == ranks}
        row: dict[str, Any] = {"name": name, "mode": mode, "runner": runner, "ranks": ranks,
                               "seeds": [r["seed"] for r in group]}
        # a ratio against an fp32 run timed on another machine compares two machines: left out
        timed = [r for r in group if r["seed"] in fp32 and one_machine(r, fp32[r["seed"]])]
        row["speedup_seeds"] = [r["seed"] for r in timed]
        row["speedup_mean"], row["speedup_sd"] = (_mean_sd([r["speedup_vs_fp32"] for r in timed])
                                                  if timed else (None, None))
        states = [r["state_bytes"] for r in group if r.get("state_bytes") is not None]
        row["state_bytes"] = statistics.fmean(states) if states else None
        vals = [r["final_val_action_l1"] for r in group if r["final_val_action_l1"] is not None]
        row["val_l1_mean"], row["val_l1_sd"] = _mean_sd(vals) if vals else (None, None)
        succ = [r["success_rate"] for r in group if r["success_rate"] is not None]
        row["success_mean"], row["success_sd"] = _mean_sd(succ) if succ else (None, None)
        is_ref = mode == "fp32" and runner == "vlamp"
        diffs = [100 * (r["final_val_action_l1"] / fp32[r["seed"]]["final_val_action_l1"] - 1)
                 for r in group if not is_ref and r["final_val_action_l1"] is not None
                 and fp32[r["seed"]]["final_val_action_l1"]]
        row["val_l1_vs_fp32_pct_per_seed"] = diffs
        row["val_l1_vs_fp32_pct"] = statistics.fmean(diffs) if diffs else None
        row["val_l1_p"] = _paired_t(diffs) if diffs else None
        row["val_l1_verdict"] = _verdict(row["val_l1_p"])
        tables = [t for r in group if not is_ref for t in [_success_pairs(r, fp32[r["seed"]])] if t]
        if tables:
            d = _paired(tables)
            row["success_vs_fp32_points"], row["success_vs_fp32_ci95"] = d["points"], d["ci95"]
            row["success_p"], row["success_pairs"] = d["p"], d["pairs"]
        else:
            row["success_vs_fp32_points"] = row["success_vs_fp32_ci95"] = row["success_p"] = None
            row["success_pairs"] = None
        row["success_verdict"] = _verdict(row["success_p"])
        row["success_by_group"] = _by_group(group, fp32, is_ref)
        rows.append(row)
    return rows


def mixed_plans(runs: list[dict[str, Any]]) -> list[str]:
    """A note for each row whose seeds ran different precision plans (measured on one machine
    and not on another, say, or by a vlamp that plans the mode otherwise): its row pools them.
    A plan is told by what its measurement decided: modules kept in FP32 and lean islands (a run
    kept from before those were recorded is told by nothing, and left out)."""
    seen: dict[str, dict[tuple[Any, Any], list[int]]] = {}
    for r in runs:
        plan = (r.get("fp32_rules"), r.get("lean_islands"))
        if None in plan:
            continue
        seen.setdefault(run_label(r), {}).setdefault(plan, []).append(r["seed"])
    notes = []
    for name, plans in seen.items():
        if len(plans) > 1:
            each = [f"seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}: {kept} modules kept in "
                    f"FP32 for speed, {lean} lean islands" for (kept, lean), s in plans.items()]
            notes.append(f"{name}: its seeds ran different precision plans ({'; '.join(each)}), "
                         f"and its row pools them")
    return notes


def _verdict(p: float | None) -> str | None:
    if p is None:
        return None
    return "differs" if p < ALPHA else "within noise"


def group_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header plus one row per summary row: success per Meta-World difficulty group (the seeds
    pooled) and its paired difference from FP32 in points with the 95% interval; ``[]`` when the
    tasks span one group."""
    rows = [r for r in rows if r.get("success_by_group")]
    if not rows:
        return []
    groups = rows[0]["success_by_group"]
    out = [["run", *[f"{g} ({v['tasks']} task{'s' if v['tasks'] > 1 else ''})" for g, v in groups.items()]]]
    for r in rows:
        cells = []
        for g in groups:
            v = r["success_by_group"][g]
            d = v.get("vs_fp32")
            cells.append(f"{100 * v['success']:.0f}%" + ("" if d is None else
                         f" ({d['points']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}])"))
        out.append([r["name"], *cells])
    return out


SUMMARY_CAPTION = ("across seeds, against the fp32 run of each seed (mean +- sd over seeds, the "
                   "speed-up over those timed on their fp32 run's machine; "
                   "validation error by a paired t-test over seeds, success by the seeds' episode "
                   "pairs pooled: the difference in points with its 95% interval and McNemar's p; "
                   "p >= 0.05 is within noise):")


def summary_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header plus one row per summary row (see :func:`summarize`): seeds, speed-up, training
    state, validation error and success, each difference from FP32 with its test."""
    out = [["run", "seeds", "speed-up", "state (MiB)", "val action L1", "vs fp32 (paired t)",
            "success", "vs fp32, paired (points, 95%)", "McNemar"]]
    for r in rows:
        state = r.get("state_bytes")
        succ, sd = r["success_mean"], r["success_sd"]
        d, p, ci = r["success_vs_fp32_points"], r["val_l1_p"], r["success_vs_fp32_ci95"]
        val_vs = "-" if r["val_l1_vs_fp32_pct"] is None else \
            f"{r['val_l1_vs_fp32_pct']:+.1f}%" + ("" if p is None else f", p {p:.2g}")
        out.append([r["name"], str(len(r["seeds"])),
                    "1.00x" if r["mode"] == "fp32" and r["runner"] == "vlamp"  # the reference
                    else _speedup(r),
                    "-" if state is None else f"{state / 2**20:.1f}",
                    _pm(r["val_l1_mean"], r["val_l1_sd"], "{:.4f}"), val_vs,
                    _pm(None if succ is None else 100 * succ, None if sd is None else 100 * sd,
                        "{:.0f}", "%"),
                    "-" if d is None else
                    f"{d:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]",
                    "-" if d is None else
                    f"p {r['success_p']:.2g}, {r['success_pairs']['episodes']} pairs"])
    return out


def _pm(mean: float | None, sd: float | None, pattern: str, unit: str = "") -> str:
    if mean is None:
        return "-"
    return pattern.format(mean) + unit + ("" if sd is None else " +- " + pattern.format(sd))


def _speedup(row: dict[str, Any]) -> str:
    """The speed-up cell: mean +- sd over the seeds timed on their FP32 run's machine, and which
    seeds those were when they are not all of the row's."""
    counted, seeds = row["speedup_seeds"], row["seeds"]
    if not counted:
        return "- (each seed's fp32 on another machine)"
    cell = _pm(row["speedup_mean"], row["speedup_sd"], "{:.2f}", "x")
    if len(counted) < len(seeds):
        cell += f" (seed{'s' if len(counted) > 1 else ''} {', '.join(map(str, counted))}: fp32's machine)"
    return cell
