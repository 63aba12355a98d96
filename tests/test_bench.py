"""``vlamp bench --quick`` and ``vlamp demo --quick`` end to end, through the command line."""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from vlamp.bench.machine import OTHER_CORES_LIMIT
from vlamp.bench.run import bench, parse_modes
from vlamp.bench.summary import SUMMARY_CAPTION
from vlamp.precision.errors import VlampError
from vlamp.train.config_io import load_config

# one xdist group: the module's cache fixture (the quick dataset) is generated once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench")]

RUN_FIELDS = {"mode", "runner", "seed", "step_time_s_median", "samples_per_s", "peak_rss_bytes",
              "state_bytes", "params_bytes", "masters_bytes", "grads_bytes", "optimizer_bytes",
              "compensation_bytes", "activations_bytes", "activations_by_module", "data_bytes",
              "final_val_action_l1",
              "success_rate", "success_per_task", "skipped_steps", "speedup_vs_fp32",
              "memory_vs_fp32", "losses", "loss_scales", "batch_size", "threads", "casts_per_step",
              "load", "warnings", "round_windows", "step_times"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache, so the quick dataset is generated here and not in the user's cache."""
    return tmp_path_factory.mktemp("cache")


def cli(cache, *args):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, "-m", "vlamp", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_bench_quick_writes_every_field_and_consistent_ratios(cache, tmp_path):
    out = tmp_path / "bench"
    # precision.measure=false: the measured plan of so tiny a model depends on timing noise (it may
    # keep every module in FP32); the dtypes checked below must not
    p = cli(cache, "bench", "--quick", "--modes", "bf16-mixed,fp16-mixed", "--steps", "4",
            "--warmup", "1", "--out", str(out), "--no-progress", "precision.measure=false")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert {"cpu", "cpu_flags", "gpu", "torch", "cpu_cores"} <= set(r["machine"])
    assert r["machine"]["torch"] == torch.__version__
    emulated = "fp16" not in r["machine"]["native_low_precision"]
    assert any("fp16-mixed runs emulated" in n for n in r["notes"]) == emulated
    runs = r["runs"]
    assert [(x["mode"], x["runner"]) for x in runs] == [
        ("fp32", "vlamp"), ("bf16-mixed", "vlamp"), ("fp16-mixed", "vlamp"), ("bf16-mixed", "torch.amp")]
    fp32 = runs[0]
    for x in runs:
        assert RUN_FIELDS <= set(x), RUN_FIELDS - set(x)
        assert len(x["losses"]) == 4 and len(x["loss_scales"]) == 4
        assert x["step_time_s_median"] > 0 and x["peak_rss_bytes"] > 2**20
        assert x["samples_per_s"] == pytest.approx(x["batch_size"] / x["step_time_s_median"])
        assert x["speedup_vs_fp32"] == pytest.approx(fp32["step_time_s_median"] / x["step_time_s_median"])
        assert x["memory_vs_fp32"] == pytest.approx(x["peak_rss_bytes"] / fp32["peak_rss_bytes"])
        assert x["state_bytes"] == sum(x[f"{k}_bytes"] for k in (
            "params", "masters", "grads", "optimizer", "compensation"))
        assert x["activations_bytes"] == sum(x["activations_by_module"].values()) > 0
        assert x["data_bytes"] > 0 and x["data_streamed"]  # frames on disk, states and actions here
        assert 0.0 <= x["success_rate"] <= 1.0 and set(x["success_per_task"]) == {"drawer-open", "drawer-close"}
        assert x["final_val_action_l1"] > 0
        # ran on the CPU: no GPU memory, no TF32, and the machine names no GPU
        assert x["device"] == "cpu" and x["gpu_peak_bytes"] is None and x["tf32"] is None
        assert x["gpu_memory_vs_fp32"] is None
    assert r["machine"]["gpu"] is None and r["machine"]["device"] == "cpu"
    # the same evaluation episodes in every run, so success is compared pair by pair with fp32
    assert all(set(map(len, x["success_outcomes"].values())) == {1} for x in runs)
    summary = {(s["mode"], s["runner"]): s for s in r["summary"]}
    assert len(summary) == 4 and summary[("bf16-mixed", "vlamp")]["success_pairs"]["episodes"] == 2
    assert SUMMARY_CAPTION in p.stdout and "vs fp32, paired (points, 95%)" in p.stdout
    assert summary[("bf16-mixed", "vlamp")]["state_bytes"] == runs[1]["state_bytes"]
    assert "peak GPU" not in p.stdout
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["memory_vs_fp32"] == 1.0
    assert all(x["lean_islands"] == 0 for x in runs)  # precision.measure=false: the mode's plan
    # bf16-mixed saves its low-precision kernels' activations in BF16: fewer bytes than FP32's
    assert runs[1]["activations_bytes"] < fp32["activations_bytes"]
    assert "bfloat16" in runs[1]["activations_by_dtype"] and "bfloat16" not in fp32["activations_by_dtype"]
    for x in runs:  # the profiler's live peak of a forward+backward holds at least what it saves
        assert x["step_peak_bytes"] >= x["step_added_bytes"] >= x["activations_bytes"] / 2 > 0
        assert x["step_peak_by_kind"]["parameters"] > 0
    assert runs[2]["loss_scales"][0] == 2.0**16  # fp16 runs under the dynamic scaler
    assert set(runs[0]["loss_scales"]) == {1.0}
    # what each run computed in, counted at the aten level: fp32 ran no low-precision kernel, each
    # low-precision run ran its format (and keeps its FP32 islands); fp32 casts nothing
    ops = [x["compute_ops_per_step"] for x in runs]
    assert set(ops[0]) == {"float32"} and runs[0]["casts_per_step"] == 0
    for x, fmt in zip(runs[1:], ("bfloat16", "float16", "bfloat16")):
        assert x["compute_ops_per_step"].get(fmt, 0) > 0 and x["compute_ops_per_step"]["float32"] > 0
        assert x["casts_per_step"] > 0
    # the workers' own step timings fit in the rounds the coordinator timed on its own clock
    for x in runs:
        assert sum(x["step_times"]) <= sum(end - start for start, end in x["round_windows"])
    # the runs took turns: 4 steps in rounds of 1, and no two runs' rounds overlap in time
    windows = sorted((w, x["mode"] + x["runner"]) for x in runs for w in x["round_windows"])
    assert all(len(x["round_windows"]) == 4 for x in runs)
    assert all(a[0][1] <= b[0][0] for a, b in itertools.pairwise(windows))
    owners = [owner for _, owner in windows]
    assert owners[:4] != owners[:1] * 4 and len(set(owners[:4])) == 4  # round 1 of each, then round 2
    for name in ("report.md", "report.html", "loss.png", "speed_memory.png", "loss_scale.png", "success.png",
                 "vs_fp32.png"):
        assert (out / name).stat().st_size > 200, name
    md = (out / "report.md").read_text()
    assert "bf16-mixed (torch.amp loop)" in md and "fp16-mixed" in md
    assert "bf16-mixed (torch.amp loop)" in p.stdout  # the table is printed too


def test_bench_compares_how_low_precision_weights_are_updated(cache, tmp_path):
    out = tmp_path / "b"
    args = ["bench", "--quick", "--modes", "bf16-true/kahan", "--steps", "3", "--warmup", "1",
            "--episodes", "0", "--no-baseline", "--out", str(out), "precision.measure=false"]
    p = cli(cache, *args, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    fp32, kahan = json.loads((out / "results.json").read_text())["runs"]
    assert kahan["mode"] == "bf16-true/kahan" and kahan["precision"] == "bf16-true"
    assert kahan["masters_bytes"] == 0 < kahan["compensation_bytes"]
    assert kahan["optimizer_bytes"] < fp32["optimizer_bytes"] / 1.5  # BF16 moments (FP32 islands aside)
    assert "bf16-true/kahan" in p.stdout and "memory by kind (MiB):" in p.stdout
    with pytest.raises(VlampError, match="an update after the slash is for -true and -storage modes"):
        parse_modes("bf16-mixed/kahan")
    # --resume, with a mode added and a seed more: the finished runs are read back, not trained
    # again; the added mode trains in seed 0, and seed 1 runs whole
    p = cli(cache, *[a if a != "bf16-true/kahan" else "bf16-true/kahan,bf16-true/naive" for a in args],
            "--seeds", "2", "--resume", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 0: 2 runs read from" in p.stderr and "seed 1: 2 runs read from" not in p.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["mode"], r["seed"]) for r in runs] == [
        ("fp32", 0), ("bf16-true/kahan", 0), ("bf16-true/naive", 0),
        ("fp32", 1), ("bf16-true/kahan", 1), ("bf16-true/naive", 1)]
    assert runs[1]["step_times"] == kahan["step_times"] and runs[2]["resumed_at_step"] == 0
    assert runs[4]["step_times"] != kahan["step_times"]  # trained, seed 1
    saved = json.loads((out / "seeds" / "seed-1.json").read_text())["runs"]
    assert [r["mode"] for r in saved] == ["fp32", "bf16-true/kahan", "bf16-true/naive"]
    # --all-seeds: the table of seed 0 also reads the seed kept beyond it, and trains nothing
    p = cli(cache, *[a if a != "bf16-true/kahan" else "bf16-true/kahan,bf16-true/naive" for a in args],
            "--resume", "--all-seeds", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 1: 3 runs read from" in p.stderr and "(--all-seeds)" in p.stderr
    table = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["step_times"]) for r in table["runs"]] == [
        (r["seed"], r["step_times"]) for r in runs]
    assert [len(row["seeds"]) for row in table["summary"]] == [2, 2, 2]
    # the seed files go on elsewhere: another out directory, another cache holding the same data
    moved = tmp_path / "moved"
    (moved / "seeds").mkdir(parents=True)
    for f in (out / "seeds").glob("seed-*.json"):
        (moved / "seeds" / f.name).write_bytes(f.read_bytes())
    seed0 = json.loads((moved / "seeds" / "seed-0.json").read_text())
    assert seed0["runs"][0]["mode"] == "fp32" and seed0["runs"][0]["machine"]["cpu"]
    seed0["runs"][0]["machine"] = {"cpu": "Elsewhere CPU", "cpu_flags": [], "gpu": None, "torch": "2.0"}
    (moved / "seeds" / "seed-0.json").write_text(json.dumps(seed0))  # as if timed on another machine
    shutil.copytree(cache, tmp_path / "other-cache")  # (copied: generating it again takes a while)
    p = cli(tmp_path / "other-cache", *[a if a != str(out) else str(moved) for a in args],
            "--seeds", "2", "--resume", "--modes", "bf16-true/naive", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 0: 2 runs read from" in p.stderr and "seed 1: 2 runs read from" in p.stderr
    warned = json.loads((moved / "results.json").read_text())["warnings"]
    assert [w.split(":")[0] for w in warned if "compare two machines" in w] == [
        "bf16-true/naive (vlamp, seed 0)"]
    assert "its fp32 run on Elsewhere CPU (no listed flags, torch 2.0)" in p.stdout
    p = cli(cache, *[a if a != "3" else "4" for a in args], "--resume")  # other settings: 4 steps
    assert p.returncode == 2 and "a benchmark with other settings" in p.stderr


def test_bench_rejects_unknown_modes(cache, tmp_path):
    p = cli(cache, "bench", "--modes", "fp32,int4", "--out", str(tmp_path / "b"))
    assert p.returncode == 2 and "unknown mode(s) int4; legal: fp32" in p.stderr
    assert not (tmp_path / "b").exists()
    p = cli(cache, "bench", "--quick", "--modes", "bf16-mixed@precision.mode=fp32", "--out",
            str(tmp_path / "b"))
    assert p.returncode == 2 and "which the bench sets itself" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "b").exists()
    # the same checks in this process (the command's one line and exit 2 are shown above)
    with pytest.raises(VlampError, match="after an @ comes a config override key=value"):
        parse_modes("bf16-mixed@lean")
    with pytest.raises(VlampError, match="unknown config key 'precision.lean_island'"):
        bench(load_config(None, []), ["fp32", "bf16-mixed@precision.lean_island=0"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_mode_twice_with_overrides_of_its_own(cache, tmp_path):
    """``MODE@KEY=VALUE``: one mode A against B in one benchmark, each run under its own label."""
    out = tmp_path / "b"
    # fp32 twice, A (the reference) against B: two runs, not three (each is a process of seconds)
    p = cli(cache, "bench", "--quick", "--modes", "fp32,fp32@train.batch_size=4",
            "--steps", "3", "--warmup", "1", "--episodes", "0", "--no-baseline", "--out", str(out),
            "precision.measure=false", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    runs = {r["mode"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["fp32", "fp32@train.batch_size=4"]
    assert runs["fp32"]["batch_size"] == 8 and runs["fp32@train.batch_size=4"]["batch_size"] == 4
    assert runs["fp32@train.batch_size=4"]["precision"] == "fp32"
    assert "fp32@train.batch_size=4" in p.stdout


def test_demo_quick_runs_the_whole_flow(cache, tmp_path):
    out = tmp_path / "demo"
    p = cli(cache, "demo", "--quick", "--out", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    for step in ("[1/5] data", "[2/5] precision", "[3/5] train", "[4/5] evaluate", "[5/5] bench"):
        assert step in p.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["eval"]["episodes"] == 2 and summary["train_steps"] == 20
    assert (out / "bench" / "results.json").exists() and (out / "bench" / "report.html").exists()
    assert list((out / "train" / "checkpoints").iterdir())
    p = cli(cache, "demo", "--quick", "--out", str(out))
    assert p.returncode == 2 and "holds an earlier demo" in p.stderr


def test_bench_flags_a_busy_machine(cache, tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = tmp_path / "bench"
        p = cli(cache, "bench", "--quick", "--modes", "fp32", "--steps", "6", "--warmup", "1",
                "--threads", "2", "--episodes", "0", "--out", str(out), "--no-progress")
    finally:
        busy.kill()
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    run = r["runs"][0]
    assert run["threads"] == 2 and run["load"]["other_cores_mean"] > OTHER_CORES_LIMIT
    assert any("other processes kept" in w for w in run["warnings"])
    assert "not trustworthy" in p.stdout and "fp32 !" in p.stdout
    assert "not trustworthy" in (out / "report.md").read_text()


def test_assess_names_each_reason_and_is_quiet_on_a_quiet_machine():
    from vlamp.bench.machine import assess

    quiet = {"other_cores_mean": 0.02, "other_cores_max": 0.1, "steal_frac": 0.0, "loadavg_max": 1.0}
    even = [0.10, 0.11, 0.10, 0.12, 0.10]
    assert assess(quiet, even) == []
    assert "1.0 cores busy" in assess({**quiet, "other_cores_mean": 1.0}, even)[0]
    assert "steal" in assess({**quiet, "steal_frac": 0.2}, even)[0]
    assert "spread widely" in assess(quiet, [0.1] * 8 + [0.5, 0.5])[0]


def test_the_time_left_is_each_runs_rounds_to_go_at_its_median_round():
    from vlamp.bench.machine import duration_text, training_left

    def rounds(*walls):
        return [{"wall_s": w} for w in walls]

    # a run paused for an hour in one round: the median keeps its pace; a run of fewer than three
    # rounds (or none) goes at the median of every round
    runs = [(rounds(100, 3700, 120), 10), (rounds(3000, 60), 10), (rounds(30) * 10, 10)]
    pooled = 30  # the median of 15 rounds, 10 of them 30 s
    assert training_left(runs) == (15, 30, 7 * 120 + 8 * pooled)
    assert training_left([*runs, ([], 10)]) == (15, 40, 7 * 120 + 8 * pooled + 10 * pooled)
    assert training_left([([], 4)]) == (0, 4, None)  # nothing trained yet: no guess
    assert training_left([(rounds(5, 5), 2)]) == (2, 2, 0.0)
    assert [duration_text(s) for s in (20, 1300, 7530)] == ["under a minute", "about 22 min",
                                                               "about 2 h 06 min"]


def test_summary_across_seeds_pairs_each_mode_with_its_seeds_fp32():
    from vlamp.bench.summary import summarize, summary_table

    def run(mode, seed, l1, outcomes, runner="vlamp", speed=1.0):
        return {"mode": mode, "runner": runner, "seed": seed, "speedup_vs_fp32": speed,
                "final_val_action_l1": l1, "success_rate": sum(outcomes) / len(outcomes),
                "success_outcomes": {"t": outcomes}}

    runs = [run("fp32", 0, 0.10, [1, 1, 0, 0]), run("fp32", 1, 0.20, [1, 0, 1, 0]),
            run("fp32", 2, 0.30, [1, 1, 1, 0]),
            # bf16 is 1% worse than its own seed's fp32 each time: a tiny but consistent difference
            run("bf16-mixed", 0, 0.101, [1, 1, 0, 0], speed=1.4),
            run("bf16-mixed", 1, 0.202, [1, 0, 1, 1], speed=1.5),
            run("bf16-mixed", 2, 0.303, [1, 1, 1, 0], speed=1.3)]
    rows = {r["mode"]: r for r in summarize(runs)}
    b = rows["bf16-mixed"]
    assert b["seeds"] == [0, 1, 2] and b["speedup_mean"] == pytest.approx(1.4)
    assert b["speedup_sd"] == pytest.approx(0.1)
    assert b["val_l1_vs_fp32_pct"] == pytest.approx(1.0) and b["val_l1_verdict"] == "differs"
    # success: 12 paired episodes, one solved only by bf16: +8.3 points, within noise
    assert b["success_pairs"] == {"episodes": 12, "only_fp32": 0, "only_this": 1}
    assert b["success_vs_fp32_points"] == pytest.approx(100 / 12) and b["success_p"] == 1.0
    assert b["success_verdict"] == "within noise"
    assert rows["fp32"]["val_l1_vs_fp32_pct"] is None and rows["fp32"]["success_p"] is None
    table = summary_table(list(rows.values()))
    assert table[0][:3] == ["run", "seeds", "speed-up"] and len(table) == 3
    assert table[1] == ["fp32", "3", "1.00x", "-", "0.2000 +- 0.1000", "-", "58% +- 14", "-", "-"]
    assert table[2][:3] == ["bf16-mixed", "3", "1.40x +- 0.10"] and table[2][3] == "-"  # no state given
    assert table[2][5].startswith("+1.0%, p ") and table[2][6] == "67% +- 14"
    assert table[2][7].startswith("+8.3 [") and table[2][8] == "p 1, 12 pairs"
    assert b["success_by_group"] is None  # task "t" is in no Meta-World difficulty group


def test_the_speed_up_across_seeds_leaves_out_ratios_that_compare_two_machines():
    """A seed whose run was timed on another machine than its fp32 run (a seed file carried over
    and a mode added there) keeps its success and validation pairs but not its speed-up."""
    from vlamp.bench.summary import summarize, summary_table

    xeon, epyc = {"cpu": "Xeon"}, {"cpu": "EPYC"}

    def run(mode, seed, speed, machine):
        return {"mode": mode, "runner": "vlamp", "seed": seed, "speedup_vs_fp32": speed,
                "final_val_action_l1": 0.1, "success_rate": 0.5, "success_outcomes": {"t": [1, 0]},
                "machine": machine}

    runs = [run("fp32", s, 1.0, xeon) for s in (0, 1, 2)]
    runs += [run("bf16-mixed", 0, 0.8, xeon), run("bf16-mixed", 1, 1.0, xeon),
             run("bf16-mixed", 2, 2.3, epyc)]  # the EPYC's step against the Xeon's fp32
    runs += [run("bf16-true", 2, 1.9, epyc)]
    rows = {r["mode"]: r for r in summarize(runs)}
    b = rows["bf16-mixed"]
    assert b["seeds"] == [0, 1, 2] and b["speedup_seeds"] == [0, 1]
    assert b["speedup_mean"] == pytest.approx(0.9) and b["success_pairs"]["episodes"] == 6
    assert rows["bf16-true"]["speedup_seeds"] == [] and rows["bf16-true"]["speedup_mean"] is None
    table = {t[0]: t for t in summary_table(list(rows.values()))}
    assert table["bf16-mixed"][2] == "0.90x +- 0.14 (seeds 0, 1: fp32's machine)"
    assert table["bf16-true"][2] == "- (each seed's fp32 on another machine)"
    runs[3]["machine"] = runs[4]["machine"] = runs[5]["machine"] = None  # not recorded: counted
    assert summarize(runs)[1]["speedup_seeds"] == [0, 1, 2]


def test_a_row_whose_seeds_ran_different_plans_is_said():
    """A mode pooled over seeds that were planned otherwise (bf16-true before and after its plan
    was measured) gets a note; rows planned alike in every seed get none."""
    from vlamp.bench.summary import mixed_plans

    def run(mode, seed, kept, lean=24):
        return {"mode": mode, "runner": "vlamp", "seed": seed, "fp32_rules": kept,
                "lean_islands": lean}

    alike = [run("fp32", s, 0, 0) for s in (0, 1, 2)]
    alike += [run("bf16-mixed", s, 12) for s in (0, 1, 2)]
    assert mixed_plans(alike) == []
    assert mixed_plans([*alike, {**run("fp32", 3, 0), "fp32_rules": None}]) == []  # not recorded
    true = [run("bf16-true", 0, 0), run("bf16-true", 1, 6), run("bf16-true", 2, 6)]
    assert mixed_plans([*alike, *true]) == [
        "bf16-true: its seeds ran different precision plans (seed 0: 0 modules kept in FP32 for "
        "speed, 24 lean islands; seeds 1, 2: 6 modules kept in FP32 for speed, 24 lean islands), "
        "and its row pools them"]


def test_summary_says_which_difficulty_group_a_precision_loses_success_in():
    """Over MT10's tasks, a mode that fails only the hard tasks fp32 solves shows the loss in the
    hard group, paired, and nothing in the others."""
    from vlamp.bench.summary import group_rows, summarize

    tasks = {"reach": "easy", "door-open": "easy", "peg-insert-side": "medium", "push": "hard",
             "pick-place": "hard"}

    def run(mode, seed, hard):
        outcomes = {t: [1] * 10 if g != "hard" else [hard] * 10 for t, g in tasks.items()}
        return {"mode": mode, "runner": "vlamp", "seed": seed, "speedup_vs_fp32": 1.0,
                "final_val_action_l1": 0.1, "success_rate": 0.0, "success_outcomes": outcomes}

    runs = [run("fp32", s, 1) for s in (0, 1)] + [run("bf16-true/naive", s, 0) for s in (0, 1)]
    rows = summarize(runs)
    g = rows[1]["success_by_group"]
    assert list(g) == ["easy", "medium", "hard"] and g["hard"]["tasks"] == 2
    assert g["easy"]["success"] == 1.0 and g["easy"]["vs_fp32"]["points"] == 0.0
    assert g["hard"]["success"] == 0.0 and g["hard"]["vs_fp32"]["points"] == -100.0
    assert g["hard"]["vs_fp32"]["pairs"] == {"episodes": 40, "only_fp32": 40, "only_this": 0}
    assert g["hard"]["vs_fp32"]["p"] < 1e-6 and "vs_fp32" not in rows[0]["success_by_group"]["hard"]
    table = group_rows(rows)
    assert table[0] == ["run", "easy (2 tasks)", "medium (1 task)", "hard (2 tasks)"]
    assert table[1] == ["fp32", "100%", "100%", "100%"] and table[2][3].startswith("0% (-100.0 [")


def test_an_interrupted_bench_goes_on_from_each_runs_last_round(cache, tmp_path):
    """Killed in the middle of a seed, a benchmark resumed with --resume trains each run on from
    the checkpoint of its last round and ends with the losses, bit for bit, of one never stopped."""
    import signal
    import time

    args = ["bench", "--quick", "--modes", "bf16-storage/kahan", "--steps", "24", "--rounds", "12",
            "--warmup", "1", "--episodes", "0", "--no-baseline", "--threads", "1",
            "precision.measure=false"]
    ref = cli(cache, *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    told = re.findall(r"\n  (\d+) of 24 rounds trained(; .+? of training left)?\n", ref.stderr)
    assert told[0][0] == "2" and told[0][1] and told[-1] == ("24", ""), told  # after every turn
    assert "train bf16-storage/kahan:" in ref.stderr  # the bars name the update, not just the mode
    out = tmp_path / "b"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "MUJOCO_GL": "egl"}
    p = subprocess.Popen([sys.executable, "-m", "vlamp", *args, "--out", str(out), "--no-progress"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    runs = out / "seeds" / "seed-0.runs"

    def checkpointed() -> int:  # runs with a checkpoint of step 4 or later (the newest is kept)
        return sum(1 for d in runs.glob("*-s0") if any(
            int(c.name.split("_")[1]) >= 4 for c in d.glob("checkpoints/step_*")))

    deadline = time.time() + 300
    while checkpointed() < 2 and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the coordinator and both runs' processes, mid-seed
    p.wait()
    assert not (out / "seeds" / "seed-0.json").exists(), "the benchmark ended before it was killed"
    other = cli(cache, *[a if a != "24" else "26" for a in args], "--out", str(out), "--resume")
    assert other.returncode == 2 and "holds runs of a benchmark with other settings" in other.stderr
    here = (runs / "machine.json").read_text()
    (runs / "machine.json").write_text(json.dumps({**json.loads(here), "cpu": "another CPU"}))
    moved = cli(cache, *args, "--out", str(out), "--resume")  # as if carried to another machine
    assert moved.returncode == 2 and "begun on another machine (another CPU" in moved.stderr
    assert moved.stderr.count("\n") == 1, moved.stderr  # one line, no traceback
    (runs / "machine.json").write_text(here)
    p = cli(cache, *args, "--out", str(out), "--resume", "--no-progress")  # said all the same
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("resumed at step") == 2, p.stderr[-3000:]
    got = json.loads((out / "results.json").read_text())["runs"]
    want = json.loads((tmp_path / "ref" / "results.json").read_text())["runs"]
    assert [r["mode"] for r in got] == [r["mode"] for r in want] == ["fp32", "bf16-storage/kahan"]
    for g, w in zip(got, want):
        assert 4 <= g["resumed_at_step"] < 24 and w["resumed_at_step"] == 0
        assert g["losses"] == w["losses"] and len(g["step_times"]) == 24
        assert g["final_val_action_l1"] == w["final_val_action_l1"]
        # the killed process's rounds are kept (one may be lost: killed between its checkpoint
        # and the coordinator's record of it)
        assert len(g["round_windows"]) in (11, 12)
    assert not runs.exists()  # the seed is written: its runs' checkpoints are gone


def test_a_seeds_runs_in_flight_resume_only_on_the_machine_they_began_on(tmp_path):
    from vlamp.bench.seeds import runs_dir
    from vlamp.precision.errors import VlampError

    here = {"cpu": "this CPU", "cpu_flags": ["avx2"], "gpu": None, "torch": "2.13.0"}
    runs = runs_dir(tmp_path / "seed-0.runs", "key", here, resume=False)
    (runs / "a-run").mkdir()
    assert runs_dir(runs, "key", here, resume=True) == runs and (runs / "a-run").is_dir()
    with pytest.raises(VlampError, match=r"begun on another machine \(this CPU \(avx2"):
        runs_dir(runs, "key", {**here, "cpu": "another CPU"}, resume=True)
    (runs / "machine.json").write_text("{not json")
    with pytest.raises(VlampError, match="cannot read .*machine.json"):
        runs_dir(runs, "key", here, resume=True)
    (runs / "machine.json").unlink()  # written before machines were recorded: this machine's
    assert runs_dir(runs, "key", {**here, "cpu": "another CPU"}, resume=True) == runs
    assert not (runs_dir(runs, "key", here, resume=False) / "a-run").exists()


def test_all_seeds_reads_each_kept_seed_beyond_seeds_paired_with_its_fp32_run(tmp_path):
    from vlamp.bench.seeds import kept_beyond

    def run(mode, seed, runner="vlamp"):
        return {"mode": mode, "runner": runner, "ranks": 1, "seed": seed}

    kept = {1: [run("fp32", 1), run("bf16-mixed", 1)],
            3: [run("fp32", 3), run("fp16-mixed", 3), run("bf16-true", 3)],  # one mode not planned
            4: [run("bf16-mixed", 4)],  # no fp32 run to pair with
            5: [run("fp32", 5)]}  # nothing to pair
    for seed, runs in kept.items():
        (tmp_path / f"seed-{seed}.json").write_text(json.dumps({"settings": "k", "runs": runs}))
    (tmp_path / "seed-x.json").write_text("{}")  # not a seed file
    plan = [("fp32", "vlamp", 1), ("bf16-mixed", "vlamp", 1), ("fp16-mixed", "vlamp", 1)]
    got = kept_beyond(tmp_path, 1, "k", plan)
    assert [(r["mode"], r["seed"]) for r in got] == [
        ("fp32", 1), ("bf16-mixed", 1), ("fp32", 3), ("fp16-mixed", 3)]
    assert [r["seed"] for r in kept_beyond(tmp_path, 2, "k", plan)] == [3, 3]  # from seed 2 on
    with pytest.raises(VlampError, match="other settings"):
        kept_beyond(tmp_path, 1, "another key", plan)
    with pytest.raises(VlampError, match="give --resume too"):  # before anything is written
        bench(load_config(None), ["fp32"], tmp_path / "out", all_seeds=True)
    assert not (tmp_path / "out").exists()


def test_the_kept_mt10_seeds_resume_under_the_config_of_today():
    """The ablation grows on the seed files kept in results/mt10-bench/seeds: the settings key of
    the command that made them must not move when a config key is added (bench.seeds.LATER_KEYS) or a
    default changes, or every kept seed would have to be trained again."""
    import dataclasses
    import math
    from pathlib import Path

    from vlamp.bench.seeds import settings_key
    from vlamp.cli.bench import run_config
    from vlamp.cli.main import build_parser
    from vlamp.data.generate import dataset_id
    from vlamp.sim.tasks import resolve_tasks

    kept = Path(__file__).parents[1] / "results" / "mt10-bench" / "seeds"
    args, _ = build_parser().parse_known_args(["bench", "--config", "mt10", "--modes",
                                               "fp32,fp16-mixed", "--seeds", "3", "--no-baseline"])
    config, episodes = run_config(args)
    d = config.dataset  # the path bench reads the generated suite from (only its name counts)
    name = dataset_id(resolve_tasks(d.tasks), d.episodes_per_task, d.image_size, 0, 200)
    config = dataclasses.replace(config, dataset=dataclasses.replace(d, path=f"/x/{name}", tasks=""))
    key = settings_key(config, 10, episodes, "auto", math.ceil(config.train.steps / args.rounds))
    files = sorted(kept.glob("seed-*.json"))
    assert len(files) >= 3 and {json.loads(f.read_text())["settings"] for f in files} == {key}
