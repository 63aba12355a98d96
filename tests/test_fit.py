"""What fits: the real-size presets, exact state bytes, the prediction's arithmetic, the budget's
refusal before the first step, and a measured peak beside a predicted one."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_MODEL, run_main, tiny_overrides
from test_cli_precision import run_cli

from vlamp.models.config import ModelConfig
from vlamp.precision.autoplan import measured_here
from vlamp.precision.errors import VlampError
from vlamp.precision.memory import parse_size
from vlamp.train import fit
from vlamp.train.config_io import load_config
from vlamp.train.fit_probe import Measured, ModeProbe

pytest.importorskip("transformers")


def test_presets_have_the_published_parameter_counts():
    from vlamp.models.hf_vla import preset_parameters

    pi0 = preset_parameters("pi0")
    assert abs(pi0 / 3.3e9 - 1) < 0.10, pi0
    # SmolVLA's published 0.45 B includes SmolVLM's untied LM head (49,280 x 960), which a
    # policy never runs and this preset does not build.
    smol = preset_parameters("smolvla")
    assert abs(smol / (450e6 - 49280 * 960) - 1) < 0.10, smol
    with pytest.raises(VlampError, match="model.name=hf-vlm"):
        ModelConfig(size="pi0")


def test_sizes_parse_and_bad_ones_say_the_legal_forms():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size("2e9") == 2 * 10**9
    for bad in ("lots", "-3GB", "12 parsecs", ""):
        with pytest.raises(VlampError, match="GiB"):
            parse_size(bad)


def _tiny() -> ModelConfig:
    return ModelConfig(dim=32, depth=3, heads=2, text_layers=2, channels=[8, 8], chunk=4,
                       vocab_size=20, image_size=32)


def test_state_is_exact_from_the_plan():
    cfg = _tiny()
    from vlamp.models.registry import build_model

    n = sum(p.numel() for p in build_model(cfg).parameters())
    state, sizes = fit.state_bytes(cfg, "fp32", "-", "auto")
    assert sum(state.values()) == 16 * n and state["weights"] == 4 * n
    low, _ = fit.state_bytes(cfg, "bf16-storage", "stochastic", "8bit")
    # bf16 weight + bf16 gradient + 2 one-byte moments with a 4-byte scale per 256, except the
    # parameters the built-in rules keep in FP32 (norms, positions, the action output)
    assert 6.0 * n < sum(low.values()) < 7.0 * n
    assert low["masters"] == 0 and sizes["low_params"] < n


def test_state_counts_the_runs_own_rules(tmp_path):
    """precision.rules that store a tower in BF16 in a -mixed mode: the weights counted are the
    set-up model's parameter bytes, and the tower's FP32 masters are counted too."""
    import torch

    from vlamp.models.registry import build_model
    from vlamp.precision.mixed_precision import MixedPrecision

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {pattern: vision, policy: bf16}\n")
    cfg = _tiny()
    plain, _ = fit.state_bytes(cfg, "bf16-mixed", "-", "auto")
    ruled, _ = fit.state_bytes(cfg, "bf16-mixed", "-", "auto", rules=str(rules))
    model = build_model(cfg)
    MixedPrecision("bf16-mixed", str(rules)).setup(model)
    assert ruled["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    low = sum(p.numel() for p in model.vision.parameters() if p.dtype == torch.bfloat16)
    assert low > 0.9 * sum(p.numel() for p in model.vision.parameters())  # its norms stay FP32
    assert plain["weights"] - ruled["weights"] == 2 * low
    assert ruled["masters"] - plain["masters"] == 4 * low
    # a frozen tower in a -mixed mode is stored in BF16 too (it was counted in FP32)
    frozen, _ = fit.state_bytes(cfg, "bf16-mixed", "-", "auto", frozen=["vision"])
    model = build_model(cfg)
    MixedPrecision("bf16-mixed", freeze=["vision"]).setup(model)
    assert frozen["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_lora_is_counted_as_trained_adapters_on_frozen_layers():
    from vlamp.models.lora import add_lora
    from vlamp.models.registry import build_model
    from vlamp.train.config import LoraConfig

    cfg, lora = _tiny(), LoraConfig(rank=2, alpha=4.0, targets=["trunk.*.qkv"])
    state, sizes = fit.state_bytes(cfg, "fp32", "-", "auto", lora=lora)
    model = build_model(cfg)
    adapters = add_lora(model, lora.targets, lora.rank, lora.alpha)
    assert len(adapters) == 3  # one per trunk layer
    frozen = sum(model.get_submodule(f"{n}.base").weight.numel() + model.get_submodule(f"{n}.base")
                 .bias.numel() for n in adapters)
    total = sum(p.numel() for p in model.parameters())
    assert sizes["params"] == total  # the adapters counted
    assert state["weights"] == 4 * total and state["grads"] == 4 * (total - frozen)
    assert state["optimizer"] == 8 * (total - frozen)  # no state for the frozen base layers
    # and the depth-extrapolated count is the same as the full build's
    deep, _ = fit.state_by_depth(cfg, "fp32", "-", "auto", lora=lora)
    assert deep == state


def _probe(per_layer: float, base: float) -> ModeProbe:
    """A probe with planted figures: ``base`` bytes per sample, ``per_layer`` more per layer."""
    def measured(layers: int) -> Measured:
        acts = {(ck, b): b * (base + per_layer * layers) * (0.5 if ck else 1.0)
                for ck in (False, True) for b in (1, 2)}
        return Measured(acts, {1: 0.1 * layers, 8: 0.5 * layers})
    return ModeProbe("fp32", {"text": 2, "trunk": 3}, measured(2),
                     {"text": measured(3), "trunk": measured(3)}, runtime_bytes=1000.0, params=100)


@pytest.mark.slow
def test_the_probe_freezes_and_plans_as_the_run_does():
    """A frozen tower saves nothing for the backward: the probe's extrapolated activations match
    the full frozen model's, measured directly, and are well below the trained model's. With the
    run's precision settings the probe trains on the plan the trainer measures, lean islands and
    all (what that plan saves is not compared: its speed half, on a CPU with native bf16, decides
    by timing which modules of so tiny a model stay FP32), and measures what that measurement's
    FP32 passes save: the trained FP32 model's activations."""
    from vlamp.models.registry import build_model
    from vlamp.precision.lean import LEAN
    from vlamp.precision.memory import ActivationMeter
    from vlamp.precision.mixed_precision import MixedPrecision
    from vlamp.train.config import PrecisionConfig

    cfg, frozen = _tiny(), ["vision", "text"]
    direct = {}
    for name, patterns in (("frozen", frozen), ("trained", [])):
        model = build_model(cfg)
        MixedPrecision("fp32", freeze=patterns).setup(model)
        with ActivationMeter(model) as meter:
            model(model.example_batch(2))
        direct[name] = float(meter.total)
    probed = fit.probe(cfg, "fp32", 2, frozen=frozen).activations(2, checkpoint=False)
    assert probed == pytest.approx(direct["frozen"], rel=0.02)
    assert probed < 0.9 * direct["trained"], (probed, direct)
    planned = fit.probe(cfg, "bf16-mixed", 2, precision=PrecisionConfig(mode="bf16-mixed"))
    for copy in (planned.base, *planned.deeper.values()):
        assert any(LEAN in r.get("label", "") for r in copy.plan["rules"]), copy.plan
    # the measurement's FP32 passes save what the trained FP32 model does, not the mode's
    fp32_passes = planned._at(lambda m, b: m.fp32_acts[b], 2)  # (extrapolated as any figure)
    assert fp32_passes == pytest.approx(direct["trained"], rel=0.02)
    assert planned.measured_activations(2) >= fp32_passes
    assert not fit.probe(cfg, "fp32", 2, frozen=frozen).base.fp32_acts  # fp32 measures nothing


def test_activations_and_time_extrapolate_in_depth_and_batch():
    p = _probe(per_layer=100.0, base=1000.0)
    # full depth: 2 + 3 = 5 layers -> 1000 + 500 per sample
    assert p.activations(4, checkpoint=False) == pytest.approx(4 * 1500)
    # checkpointed: half saved, plus one layer's activations for its recomputation
    assert p.activations(4, checkpoint=True) == pytest.approx(4 * 750 + 4 * 100)
    c = fit.Candidate("fp32", micro_batch=8, grad_accum=2)
    assert p.step_seconds(c) == pytest.approx(2 * 0.5 * 5 / 2 * 2, rel=1e-6)


def test_choose_takes_the_fastest_that_fits_and_the_table_says_why():
    p = _probe(per_layer=100.0, base=1000.0)
    state = {"weights": 4e3, "masters": 0.0, "compensation": 0.0, "grads": 4e3, "optimizer": 8e3}
    sizes = {"largest_param": 10, "largest_module": 10, "low_params": 0}
    preds = [fit.predict(c, state, sizes, p, 100) for c in fit.candidates(["fp32"], 64)]
    budget = sorted(q.peak for q in preds)[len(preds) // 2]
    chosen = fit.choose(preds, budget)
    assert chosen.fits and all(q.step_s >= chosen.step_s for q in preds if q.fits)
    assert any(not q.fits for q in preds)
    text = fit.table(preds, budget, chosen)
    assert "* " + chosen.candidate.label() in text and "no" in text
    for q in preds:  # every kind is counted at one moment of the step, and they sum to the peak
        assert q.peak == sum(q.by_kind.values()) and set(q.by_kind) == set(fit.KINDS)


def test_on_a_cpu_the_fp32_build_is_a_moment_of_its_own():
    """A frozen backbone stored in bf16 holds 2 bytes per parameter while it trains, but it is
    built in FP32 first: 4 bytes per parameter before anything else (on a GPU, in the host's)."""
    p = _probe(per_layer=100.0, base=1000.0)
    state = {"weights": 2e8, "masters": 0.0, "compensation": 0.0, "grads": 0.0, "optimizer": 0.0}
    sizes = {"largest_param": 10, "largest_module": 10, "low_params": 10**8, "params": 10**8}
    c = fit.Candidate("bf16-storage", "stochastic", "auto", micro_batch=1)
    here = fit.predict(c, state, sizes, p, 100)
    assert here.by_kind["weights"] == 4e8 and here.by_kind["activations"] == 0
    assert here.peak == 4e8 + p.runtime_bytes
    gpu = fit.predict(c, state, sizes, p, 100, built_here=False)
    assert gpu.by_kind["weights"] == 2e8 and gpu.peak < here.peak



def test_a_measured_plan_is_a_moment_of_its_own():
    """Measuring the plan holds the FP32 model, a planned copy, FP32 and planned gradients of the
    trained parameters and one forward's activations, before the run is set up: with a frozen
    backbone (LoRA), more than the build or the step; a run that does not measure skips it."""
    p = _probe(per_layer=100.0, base=1000.0)
    state = {"weights": 2e8, "masters": 0.0, "compensation": 0.0, "grads": 4e6, "optimizer": 8e6}
    sizes = {"largest_param": 10, "largest_module": 10, "largest_grad": 10, "low_params": 10**8,
             "params": 10**8, "trained": 10**6}
    c = fit.Candidate("bf16-mixed", micro_batch=2)
    measured = fit.predict(c, state, sizes, p, 100, measured=True)
    assert measured.moment == "measure"
    assert measured.by_kind["weights"] == 4e8 + 2e8 and measured.by_kind["grads"] == 4e6 + 4e6
    assert measured.by_kind["activations"] == p.activations(2, checkpoint=False)
    assert measured.peak == 6e8 + 8e6 + p.activations(2, False) + 2 * 100 + p.runtime_bytes
    # where the probe measured the plan, its FP32 passes' activations when they are more
    for m in (p.base, *p.deeper.values()):
        m.fp32_acts = {b: 3 * m.acts[(False, b)] for b in (1, 2)}
    assert p.measured_activations(2) == 3 * p.activations(2, checkpoint=False)
    fp32_passes = fit.predict(c, state, sizes, p, 100, measured=True)
    assert fp32_passes.by_kind["activations"] == 3 * p.activations(2, checkpoint=False)
    plain = fit.predict(c, state, sizes, p, 100)
    assert plain.moment == "build" and plain.peak == 4e8 + p.runtime_bytes
    # the same run with its plan in the cache measures nothing: the plain prediction
    assert fp32_passes.if_cached == plain and plain.if_cached is None
    on_gpu = fit.predict(c, state, sizes, p, 100, built_here=False)
    assert on_gpu.moment == "step" and on_gpu.peak < plain.peak


def test_a_run_over_its_budget_only_while_measured_says_so(monkeypatch):
    """A run over its budget only while it measures its plan fits if the plan is cached; over it
    even then, the refusal names the moment and the way out, precision.measure=false."""
    import torch

    from vlamp.train import budget as bud

    _, cfg = _planted_probes(monkeypatch)
    monkeypatch.setattr(bud, "measured_here", lambda mode, device: mode != "fp32")
    monkeypatch.setattr(bud, "candidate_modes", lambda device: (["fp32", "bf16-mixed"], []))
    cpu = torch.device("cpu")
    cfg.precision.mode = "bf16-mixed"
    cfg.train.freeze = ["text", "trunk"]  # a frozen backbone: the measurement's copy is the peak
    measured = bud.fit_run(cfg, cpu, 2**40).asked
    cfg.precision.measure = False
    plain = bud.fit_run(cfg, cpu, 2**40).asked
    assert measured.moment == "measure" != plain.moment and plain.peak < measured.peak
    cfg.train.memory_budget = str((plain.peak + measured.peak) // 2)
    assert bud.check_budget(cfg, cpu)[1].fits
    cfg.precision.measure = True  # fits only if the plan is in the cache: the trainer looks there
    _, mine = bud.check_budget(cfg, cpu)
    assert not mine.fits and mine.moment == "measure" and mine.peak == measured.peak
    assert mine.if_cached.fits and mine.if_cached.peak == plain.peak
    assert "no measured plan is cached" in bud.uncached_refusal(cfg, cpu, mine)
    from vlamp.cli.fit import _row  # what vlamp fit --json says of each

    assert _row(mine)["peak_if_plan_cached_bytes"] == plain.peak
    assert _row(plain)["peak_if_plan_cached_bytes"] is None
    cfg.train.memory_budget = str(plain.peak - 1)  # over it even from the cache
    with pytest.raises(VlampError, match=r"at its plan's measurement \(precision.measure=false"):
        bud.check_budget(cfg, cpu)

def _planted_probes(monkeypatch):
    """Replaces the fit's probe with a planted one; returns the modes it is asked to probe, and a
    run config of the tiny model at batch 4."""
    import dataclasses as dc

    from vlamp.train.config import RunConfig

    probed = []

    def planted(config, mode, batch, log=None, device="cpu", frozen=(), lora=None, precision=None):
        probed.append(mode)
        return dc.replace(_probe(per_layer=100.0, base=1000.0), mode=mode, depths={})
    monkeypatch.setattr(fit, "probe", planted)
    cfg = dc.replace(RunConfig(), model=_tiny())
    cfg.train.batch_size = 4
    return probed, cfg


def test_a_mode_whose_state_alone_is_over_the_budget_is_not_probed(monkeypatch):
    """Probing fp32 on pi0's shallow copy alone took 20 GB here: a mode whose weights and
    optimizer state rule it out is listed as not fitting without being measured."""
    import torch

    from vlamp.models.registry import build_model
    from vlamp.train import budget as bud

    probed, cfg = _planted_probes(monkeypatch)
    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    lines = []
    result = bud.fit_run(cfg, torch.device("cpu"), 5 * n, ["fp32", "bf16-storage"], lines.append)
    # fp32 holds at least 6 B/param before gradients (with 8-bit moments); bf16-storage about 4
    assert probed == ["bf16-storage"]
    assert any("fp32 not probed" in line for line in lines)
    rows = [p for p in result.predictions if p.candidate.mode == "fp32"]
    assert rows and not any(p.fits for p in rows) and all(p.step_s != p.step_s for p in rows)
    assert "-" in fit.table(result.predictions, result.budget, None, 999)
    mine = min((p for p in result.predictions if p.candidate.mode == "bf16-storage"),
               key=lambda p: p.step_s)
    assert "would be faster" not in fit.reason(mine, rows)  # no time to be faster by


def test_a_rules_file_for_one_mode_is_the_only_mode_predicted(monkeypatch, tmp_path):
    """A rules file naming its mode holds for that mode alone: fit predicts only it (it once
    tried every mode and failed on the first with 'mode fp32 was asked for'), and refuses modes
    that leave it out in one line."""
    import torch

    from vlamp.train import budget as bud

    rules = tmp_path / "rules.yaml"
    rules.write_text("mode: bf16-mixed\nrules:\n  - {pattern: 'vision.*', policy: fp32}\n")
    probed, cfg = _planted_probes(monkeypatch)
    cfg.precision.rules = str(rules)
    result = bud.fit_run(cfg, torch.device("cpu"), 2**40)
    assert probed == ["bf16-mixed"] and {p.candidate.mode for p in result.predictions} == {"bf16-mixed"}
    assert any("the rules file" in n for n in result.notes)
    with pytest.raises(VlampError, match="is for mode 'bf16-mixed': predict that mode"):
        bud.fit_run(cfg, torch.device("cpu"), 2**40, ["fp32", "bf16-storage"])


@pytest.mark.slow
def test_a_run_over_its_budget_is_refused_before_its_first_step(tiny_dataset, tmp_path, monkeypatch):
    from vlamp.train import budget
    from vlamp.train.trainer import Trainer

    monkeypatch.setattr(budget, "CPU_MODES", ("fp32",))  # the suggestion searched over fp32 only
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "r", "fp32",
                                           "train.memory_budget=1MB"))
    with pytest.raises(VlampError, match=r"needs .* GiB \(predicted\), over the budget of 0.00 GiB"):
        Trainer(cfg, progress=False)
    assert not any((tmp_path / "r").rglob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not measured_here("bf16-mixed"), reason="bf16 is emulated here: no plan measured")
def test_a_run_that_fits_only_with_its_plan_cached_looks_in_the_cache(tiny_dataset, tmp_path,
                                                                      monkeypatch):
    """With a budget that holds the run but not its plan's measurement, the trainer reads the
    plan from the cache and measures nothing; with the cache empty it refuses, before any step."""
    import shutil

    from vlamp.train.trainer import Trainer

    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    # probed once: the probe's runtime figure moves by MiBs between processes, more than this tiny
    # model's measurement adds, and the three runs must be predicted alike
    probed, real = {}, fit.probe

    def probe_once(config, mode, *rest):
        if mode not in probed:
            probed[mode] = real(config, mode, *rest)
        return probed[mode]

    monkeypatch.setattr(fit, "probe", probe_once)

    def trainer(out, *more):
        cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / out, "bf16-mixed",
                                               "precision.measure=true", *more))
        cfg.train.freeze = ["text", "trunk"]  # a frozen backbone: the measurement is the peak
        return Trainer(cfg, progress=False)

    roomy = trainer("a", "train.memory_budget=20GiB")  # measures the plan, and caches it
    asked = roomy.predicted
    assert asked.moment == "measure" and asked.if_cached.peak < asked.peak
    assert roomy.mp.plan.measured["from_cache"] is False
    budget = f"train.memory_budget={(asked.peak + asked.if_cached.peak) // 2}"
    tight = trainer("b", budget)
    assert tight.predicted.fits and tight.predicted.moment != "measure"
    assert tight.mp.plan.measured["from_cache"] is True
    shutil.rmtree(cache / "vlamp" / "plans")
    with pytest.raises(VlampError, match="no measured plan is cached for this model"):
        trainer("c", budget)
    assert not any((tmp_path / "c").rglob("*.safetensors"))


@pytest.mark.slow
def test_auto_with_a_budget_trains_with_the_fits_choice(tiny_dataset, tmp_path, monkeypatch):
    from vlamp.train import budget
    from vlamp.train.trainer import Trainer

    monkeypatch.setattr(budget, "CPU_MODES", ("bf16-storage",))  # one mode to probe, not four
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "r", "auto",
                                           "train.memory_budget=20GiB", "train.batch_size=16"))
    trainer = Trainer(cfg, progress=False)
    chosen = trainer.predicted.candidate
    assert trainer.predicted.fits and chosen.mode == "bf16-storage" == trainer.mp.mode.name
    t = trainer.config.train
    assert (t.batch_size, t.grad_accum) == (chosen.micro_batch, chosen.grad_accum)
    assert t.batch_size * t.grad_accum == 16


@pytest.mark.slow
def test_the_measured_peak_is_recorded_beside_the_predicted_one(tiny_dataset, tmp_path):
    """In a fresh process, as a run is (a long-lived one reuses memory it freed before)."""
    out = tmp_path / "r"
    code, _, err = run_cli("train", *tiny_overrides(
        tiny_dataset, out, "fp32", "train.memory_budget=auto", "train.batch_size=16",
        "train.steps=3", "--no-progress"))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = [r for r in rows if r["kind"] == "memory"]
    assert len(memory) == 1 and memory[0]["predicted_peak_bytes"] > 0
    assert memory[0]["predicted_at"] in ("forward", "step", "build")  # fp32 measures nothing
    # A tiny model: the runtime's own bytes dominate; the README's table holds the 10% figures
    assert 0.5 < memory[0]["peak_bytes"] / memory[0]["predicted_peak_bytes"] < 1.5


def test_fit_cli_rejects_bad_input_in_one_line(capsys):
    for args, match in ((["--budget", "lots"], "not a size"), (["--modes", "fp33"], "fp33")):
        code, _, err = run_main(capsys, "fit", *args, *TINY_MODEL)
        assert code == 2 and match in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_step_in_backward_is_refused_where_it_cannot_hold():
    with pytest.raises(VlampError, match="clip_grad_norm=0"):
        load_config(None, ["precision.step_in_backward=true"])
    cfg = load_config(None, ["precision.step_in_backward=true", "train.clip_grad_norm=0"])
    assert cfg.precision.step_in_backward
    cands = fit.candidates(["bf16-storage", "bf16-true"], 8, in_backward=True)
    assert "bf16-storage/stochastic+8bit in-bwd 8x1" in {c.label() for c in cands}
    assert not any(c.update == "master" and c.in_backward for c in cands)
    assert any(c.update == "master" for c in cands)  # FP32 masters are candidates, only not in-bwd
